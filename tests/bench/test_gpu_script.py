"""bench/gpu.sh --dry-run: prints every command of the real run and validates, without a
GPU, what the real run needs (data, imports, the CLI's flags, the gpu-marked tests)."""

from __future__ import annotations

import os
import subprocess

from tasks.paths import PROJECT_DIR


def dry_run(**env: str) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", "bench/gpu.sh", "--dry-run"], cwd=PROJECT_DIR, text=True,
                          capture_output=True, timeout=300, env={**os.environ, **env})


def test_dry_run_prints_every_command_and_passes_its_checks(imdb_dir):
    done = dry_run(LORAFLOW_DATA=str(imdb_dir), OUT_DIR="bench/results/gpu")
    assert done.returncode == 0, done.stdout + done.stderr
    out = done.stdout
    for command in ("nvidia-smi", "tests/bench/test_gpu_training.py tests/tasks/test_gpu.py "
                    "tests/tasks/test_train_step.py", "tasks.cli bench --sweep --device cuda",
                    f"--data {imdb_dir}", "--out bench/results/gpu", "sweep.log"):
        assert command in out, command
    assert "FAILED" not in out
    assert out.count("ok: ") == 6
    for test in ("test_fp16_with_grad_scaler_has_no_nan_and_lowers_the_loss",
                 "test_cuda_step_is_fused_and_logs_the_floats_float_loss_gives",
                 "test_k_slot_lease_admits_k_tasks_per_real_device"):
        assert test in out, test
    assert out.rstrip().endswith("dry run ok")


def test_dry_run_fails_without_data(tmp_path):
    done = dry_run(LORAFLOW_DATA=str(tmp_path / "missing"))
    assert done.returncode == 1
    assert "FAILED: data folder" in done.stdout
