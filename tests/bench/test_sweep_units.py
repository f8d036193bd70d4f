"""bench/sweep.py's pieces that need no training: the FLOP count, k's default, the start
method, and the CLI's --sweep / --k."""

from __future__ import annotations

import pytest

from bench import sweep
from tasks import cli, slots


def test_lora_step_flops_count_every_matrix_forward_and_back_and_the_trainable_grads():
    assert sweep.lora_step_flops(params=100, trainable=10, tokens=3) == (400 + 20) * 3


def test_k_defaults_to_two_on_the_cpu_and_to_auto_on_cuda(monkeypatch):
    assert sweep.default_k("cpu", 8) == 2 and sweep.default_k("cpu", 1) == 1
    monkeypatch.setattr(slots, "nvidia_smi_gpus", lambda: [slots.Gpu(0, 141 << 30, 140 << 30)])
    monkeypatch.setattr(slots, "task_bytes", lambda artifacts=None: 20 << 30)
    monkeypatch.setattr(slots.os, "cpu_count", lambda: 16)
    assert sweep.default_k("cuda", 8) == 6  # floor(0.9 x 140 / 20)
    assert sweep.default_k("cuda:0", 4) == 4  # never more than the variants


def test_children_never_fork_a_process_that_may_hold_cuda_state():
    assert sweep.start_method("cuda:0") == "forkserver"
    assert sweep.start_method("cpu") == "fork"


def test_the_quick_sweep_is_two_variants_and_the_full_one_eight(imdb_dir):
    assert [v.name for v in sweep.sweep_config(str(imdb_dir), True).variants()] == [
        "lora_r4_qkvo_lr1e-3_s42", "lora_r4_qkvo_lr2e-3_s42"]
    full = sweep.sweep_config(str(imdb_dir), False)
    assert len(full.variants()) == 8 and {v.method for v in full.variants()} == {"lora"}
    assert (full.model, full.train_size, full.val_size, full.test_size) == (
        "embedded-minilm", 2000, 500, 1000)


def test_cli_passes_sweep_and_k_and_refuses_k_alone(monkeypatch, capsys):
    seen = []
    monkeypatch.setattr(sweep, "main", lambda argv: seen.append(argv) or 0)
    assert cli.main(["bench", "--sweep", "--quick", "--k", "3", "--out", "x"]) == 0
    assert seen == [["--quick", "--out", "x", "--device", "cpu", "--k", "3"]]
    assert cli.main(["bench", "--k", "3"]) == 2
    assert "--k applies to --sweep only" in capsys.readouterr().err


@pytest.mark.parametrize("k", [0, -2])
def test_sweep_refuses_k_below_one(k, imdb_dir, capsys):
    with pytest.raises(SystemExit):
        sweep.main(["--k", str(k), "--data", str(imdb_dir)])
    assert "--k must be >= 1" in capsys.readouterr().err
