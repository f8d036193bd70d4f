"""tasks_per_gpu (LORAFLOW_TASKS_PER_GPU): parsing, `auto`, and the pool `gpu` that every
entry point (make ui / make run through scripts/, make cluster, docker/) derives from it.
GPUs are faked: a stand-in nvidia-smi on PATH, a stand-in airflow that records its calls."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import slots
from tasks.paths import PROJECT_DIR

GiB = 1 << 30


@pytest.mark.parametrize("value, expected", [(None, 1), ("", 1), ("3", 3), (" 2 ", 2),
                                             ("auto", "auto"), ("AUTO", "auto")])
def test_parse_reads_a_number_or_auto(value, expected):
    assert slots.parse(value) == expected


@pytest.mark.parametrize("value", ["0", "-1", "two", "1.5", "auto4"])
def test_parse_refuses_anything_else_naming_the_setting(value):
    with pytest.raises(ValueError, match=f"LORAFLOW_TASKS_PER_GPU must be .* got '{value}'"):
        slots.parse(value)


@pytest.mark.parametrize("value", [1, 3, "auto"])
def test_without_a_gpu_k_is_one_whatever_the_setting(value):
    assert slots.resolve(value, []) == 1
    assert slots.plan([], value) == {"gpus": 0, "tasks_per_gpu": 1, "pool_slots": 1}


def test_a_number_is_taken_as_given_on_gpus():
    assert slots.plan([slots.Gpu(0, 80 * GiB, 80 * GiB)] * 2, 3) == {
        "gpus": 2, "tasks_per_gpu": 3, "pool_slots": 6}


def test_auto_fits_the_smallest_gpus_free_memory_and_caps_at_cores_and_auto_max():
    gpus = [slots.Gpu(0, 80 * GiB, 60 * GiB), slots.Gpu(1, 80 * GiB, 40 * GiB)]
    assert slots.resolve("auto", gpus, per_task_bytes=10 * GiB, cpus=64) == 3  # 0.9 x 40 / 10
    assert slots.resolve("auto", gpus, per_task_bytes=1 * GiB, cpus=64) == slots.AUTO_MAX
    assert slots.resolve("auto", gpus, per_task_bytes=1 * GiB, cpus=6) == 3  # 6 cores / 2 GPUs
    assert slots.resolve("auto", gpus, per_task_bytes=100 * GiB, cpus=64) == 1  # never 0


def test_auto_uses_the_largest_measured_cuda_peak_else_the_paper_estimate(tmp_path):
    assert slots.measured_peak_bytes(tmp_path) is None
    estimate = slots.estimated_peak_bytes(**slots.PAPER_FULL_FINETUNE)
    assert slots.task_bytes(tmp_path) == estimate + slots.CONTEXT_BYTES
    # full fine-tuning of DistilBERT-base at 16 x 512: weights, grads and Adam (1.07 GB)
    # plus activations (6 layers x 16 x 512 x 768 x 74 bytes x 2 for fp32)
    assert estimate == 16 * 66_955_010 + 6 * int(16 * 512 * 768 * (34 + 5 * 12 * 512 / 768) * 2)
    for name, kind, peak in [("a", "cuda_max_allocated", 3 * GiB),
                             ("b", "cuda_max_allocated", 5 * GiB),
                             ("c", "cpu_peak_rss_increase", 50 * GiB)]:  # not device memory
        folder = tmp_path / "runs" / "r1" / "results" / name
        folder.mkdir(parents=True)
        (folder / "metrics.json").write_text(json.dumps(
            {"peak_memory_kind": kind, "peak_memory_bytes": peak}))
    assert slots.measured_peak_bytes(tmp_path) == 5 * GiB
    assert slots.task_bytes(tmp_path) == 5 * GiB + slots.CONTEXT_BYTES


# --- entry points ---------------------------------------------------------------------------

def fake_bin(tmp_path: Path, gpus: int) -> Path:
    """A bin folder with a stand-in nvidia-smi listing `gpus` 80 GiB GPUs (none: absent)
    and a stand-in airflow that records its arguments and the k it was given."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    if gpus:
        rows = "\\n".join(f"{i}, 81920, 81000" for i in range(gpus))
        (bin_dir / "nvidia-smi").write_text(f'#!/bin/sh\nprintf "{rows}\\n"\n')
        (bin_dir / "nvidia-smi").chmod(0o755)
    calls = tmp_path / "airflow-calls"
    (bin_dir / "airflow").write_text(
        f'#!/bin/sh\necho "$* | k=$LORAFLOW_TASKS_PER_GPU" >> {calls}\n')
    (bin_dir / "airflow").chmod(0o755)
    return bin_dir


def run_script(tmp_path: Path, script: str, gpus: int, k: str | None, *args: str,
               extra: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess, list[str]]:
    bin_dir = fake_bin(tmp_path, gpus)
    env = {k_: v for k_, v in os.environ.items() if k_ != "LORAFLOW_TASKS_PER_GPU"}
    env.update(PATH=f"{bin_dir}:/usr/bin:/bin", AIRFLOW_HOME=str(tmp_path / "home"),
               LORAFLOW_AIRFLOW_BIN=str(bin_dir / "airflow"),
               LORAFLOW_ARTIFACTS=str(tmp_path / "artifacts"), **(extra or {}))
    if k is not None:
        env["LORAFLOW_TASKS_PER_GPU"] = k
    done = subprocess.run(["bash", str(PROJECT_DIR / "scripts" / script), *args], env=env,
                          capture_output=True, text=True, timeout=120, cwd=tmp_path)
    calls = tmp_path / "airflow-calls"
    return done, calls.read_text().splitlines() if calls.exists() else []


def pool_call(calls: list[str]) -> str:
    return next(c for c in calls if c.startswith("pools set gpu ")).split(" ")[3]


@pytest.mark.parametrize("gpus, k, slots_", [(0, None, "1"), (0, "3", "1"), (2, None, "2"),
                                             (2, "3", "6"), (1, "auto", str(min(8, os.cpu_count() or 1)))])
def test_airflow_init_behind_make_ui_sizes_the_pool(tmp_path, gpus, k, slots_):
    done, calls = run_script(tmp_path, "airflow_init.sh", gpus, k)
    assert done.returncode == 0, done.stderr
    assert calls[0].startswith("db migrate")
    assert pool_call(calls) == slots_
    assert f"pool gpu: {slots_} slot(s), {gpus} GPU(s) found" in done.stdout


def test_airflow_init_refuses_a_bad_setting_with_its_name(tmp_path):
    done, calls = run_script(tmp_path, "airflow_init.sh", 1, "many")
    assert done.returncode != 0
    assert "LORAFLOW_TASKS_PER_GPU must be a whole number >= 1 or 'auto', got 'many'" in done.stderr
    assert not any(c.startswith("pools set") for c in calls)


def test_make_run_resizes_the_pool_and_hands_k_to_the_tasks(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "airflow.db").touch()  # an existing Airflow home: no init
    done, calls = run_script(tmp_path, "run_dag.sh", 2, "auto", "smoke")
    assert not any(c.startswith("db migrate") for c in calls)
    k = min(8, (os.cpu_count() or 1) // 2) or 1
    assert pool_call(calls) == str(2 * k)
    dags_test = next(c for c in calls if c.startswith("dags test"))
    assert dags_test.endswith(f"k={k}")  # resolved: the tasks lease k slots per GPU
    assert done.returncode != 0  # the stand-in airflow ran no DAG: no run folder


def test_make_run_without_a_gpu_keeps_one_slot(tmp_path):
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "airflow.db").touch()
    _, calls = run_script(tmp_path, "run_dag.sh", 0, "4", "smoke")
    assert pool_call(calls) == "1"
    assert next(c for c in calls if c.startswith("dags test")).endswith("k=1")


def test_python_m_tasks_slots_prints_the_plan(tmp_path):
    bin_dir = fake_bin(tmp_path, 2)
    env = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}", "LORAFLOW_TASKS_PER_GPU": "4",
           "PYTHONPATH": str(PROJECT_DIR)}
    done = subprocess.run([sys.executable, "-m", "tasks.slots"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.stdout.strip() == "GPUS=2 TASKS_PER_GPU=4 POOL_SLOTS=8"
    env["LORAFLOW_TASKS_PER_GPU"] = "0"
    done = subprocess.run([sys.executable, "-m", "tasks.slots"], env=env, capture_output=True,
                          text=True, timeout=60)
    assert done.returncode == 2 and "got '0'" in done.stderr
