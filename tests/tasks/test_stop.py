"""Stop signals (tasks.stop): Airflow clears a running task or marks it failed with
SIGTERM, a user presses Ctrl-C. A variant used to train on to the end and write `ok` and
its adapter; now it stops at its next step and records why, and `loraflow run` stops with
one line. The signals are sent by the test process to itself, from inside the work, so
each lands at a known point; the tests assert on the state left behind, not on time."""

from __future__ import annotations

import dataclasses
import os
import signal

import pytest

import tasks.pipeline
import tasks.train
from tasks.cli import main
from tasks.metrics import MetricsRecord
from tasks.registry import Variant
from tasks.stop import Interrupted, check_stop, stop_on_signals
from tasks.tokenize import tokenize_dataset
from tasks.variants import run_variant

LORA = Variant("lora", rank=4, targets="qkvo", lr=2e-3, seed=3)


@pytest.fixture
def two_epochs(smoke_run, imdb_sample):
    """A smoke run ready to train: 64 train rows (4 steps of 16 per epoch), 2 epochs."""
    config, paths = smoke_run
    config = dataclasses.replace(config, epochs=2)
    paths.data_dir.mkdir(parents=True, exist_ok=True)
    for split, size in (("train", 64), ("validation", 32), ("test", 32)):
        imdb_sample[split].head(size).to_parquet(paths.split_parquet(split))
    tokenize_dataset(config, paths)
    return config, paths


@pytest.fixture
def airflow_like_handler():
    """A SIGTERM handler in place before the variant, as Airflow's task runner has one
    (it calls the operator's on_kill): it must still run, and be back afterwards."""
    calls: list[int] = []

    def on_term(signum, frame):
        calls.append(signum)

    previous = signal.signal(signal.SIGTERM, on_term)
    yield on_term, calls
    signal.signal(signal.SIGTERM, previous)


def _count_training_steps(monkeypatch, on_step=None) -> list[int]:
    """Count the training forward passes of the variant's model; `on_step(n)` after the
    n-th one's forward."""
    import tasks.models

    steps: list[int] = []
    real = tasks.models.load_classifier

    def load_classifier(*args, **kwargs):
        model = real(*args, **kwargs)

        def hook(module, inputs, output):
            if module.training:
                steps.append(len(steps) + 1)
                if on_step:
                    on_step(len(steps))

        model.register_forward_hook(hook)
        return model

    monkeypatch.setattr(tasks.models, "load_classifier", load_classifier)
    return steps


def _sigterm() -> None:
    os.kill(os.getpid(), signal.SIGTERM)


def _stopped_record(paths) -> MetricsRecord:
    out = paths.variant_dir(LORA.name)
    record = MetricsRecord.read(out / "metrics.json")
    assert record.status == "failed", record.status
    assert record.error.startswith("Interrupted: stopped by SIGTERM"), record.error
    assert not (out / "adapter").exists() and not (out / "predictions.parquet").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")]  # no half-written folder
    return record


def test_sigterm_during_training_stops_at_the_next_step_and_is_recorded(
        two_epochs, monkeypatch, airflow_like_handler):
    config, paths = two_epochs
    on_term, airflow_calls = airflow_like_handler
    steps = _count_training_steps(monkeypatch, lambda n: n == 1 and _sigterm())
    with pytest.raises(Interrupted, match="stopped by SIGTERM"):
        run_variant(LORA, config, paths, device="cpu")
    assert steps == [1]  # the step under way finished; the next one did not start
    _stopped_record(paths)
    assert not (paths.variant_dir(LORA.name) / "checkpoints").exists()  # before epoch 1's end
    assert airflow_calls == [signal.SIGTERM]  # Airflow's own handler still ran...
    assert signal.getsignal(signal.SIGTERM) is on_term  # ...and is back in place


def test_sigterm_after_an_epoch_keeps_its_checkpoint_and_a_rerun_resumes_from_it(
        two_epochs, monkeypatch):
    config, paths = two_epochs
    save = tasks.train.save_checkpoint

    def save_then_sigterm(*args):
        target = save(*args)
        _sigterm()
        return target

    monkeypatch.setattr(tasks.train, "save_checkpoint", save_then_sigterm)
    steps = _count_training_steps(monkeypatch)
    with pytest.raises(Interrupted):
        run_variant(LORA, config, paths, device="cpu")
    assert steps == [1, 2, 3, 4]  # epoch 1; epoch 2 never started
    _stopped_record(paths)
    checkpoints = paths.variant_dir(LORA.name) / "checkpoints"
    assert [p.name for p in checkpoints.iterdir()] == ["epoch-001"]

    monkeypatch.setattr(tasks.train, "save_checkpoint", save)
    record = MetricsRecord.read(run_variant(LORA, config, paths, device="cpu"))
    assert (record.status, record.resumed_from_epoch) == ("ok", 1)


def test_sigterm_after_training_writes_no_adapter_and_no_ok_record(two_epochs, monkeypatch):
    """Marking the task failed while the test subset was being scored used to end in
    `status: ok` and an adapter: the model is put in place only once everything is done."""
    config, paths = two_epochs
    real = tasks.train.latency_fields

    def latency_then_sigterm(*args, **kwargs):
        _sigterm()  # the next forward pass stops
        return real(*args, **kwargs)

    monkeypatch.setattr(tasks.train, "latency_fields", latency_then_sigterm)
    with pytest.raises(Interrupted):
        run_variant(LORA, config, paths, device="cpu")
    _stopped_record(paths)


def test_a_signal_after_the_last_check_still_stops_the_block():
    with pytest.raises(Interrupted, match="SIGTERM"), stop_on_signals():
        _sigterm()  # no step checks after this one


def test_ctrl_c_is_a_recorded_stop_and_a_second_signal_stops_at_once():
    with pytest.raises(Interrupted, match="stopped by SIGINT"), stop_on_signals():
        os.kill(os.getpid(), signal.SIGINT)  # no KeyboardInterrupt here: the flag is set
        with pytest.raises(Interrupted, match="stopped by SIGINT"):
            check_stop()
        with pytest.raises(Interrupted, match="stopped by SIGTERM"):
            _sigterm()  # the second: at once
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    check_stop()  # nothing left over for later work


# --- loraflow run -----------------------------------------------------------------------------

def _stopping_training(signum: int):
    """tasks.train.train_variant that receives `signum` at its first step, then steps on."""
    def train_variant(job, module, **kwargs):
        os.kill(os.getpid(), signum)
        for _ in range(100):
            check_stop()
        raise AssertionError("training went on after the stop signal")

    return train_variant


@pytest.mark.parametrize("signum, code", [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_loraflow_run_stops_records_and_says_so_in_one_line(
        signum, code, smoke_config, artifacts, imdb_sample, monkeypatch, capsys):
    from tasks.pipeline import prepare_run
    from tests.tasks.conftest import write_run_data

    config = dataclasses.replace(smoke_config, methods=("majority", "lora"), ranks=(4, 8))
    paths = prepare_run(config, "stopped", artifacts)
    write_run_data(paths, imdb_sample)
    monkeypatch.setattr(tasks.pipeline, "DATA_STEPS", ())  # the data is there
    monkeypatch.setattr(tasks.train, "train_variant", _stopping_training(signum))
    handlers = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    assert main(["run", "--preset", "smoke", "--data", config.data, "--train-size", "64",
                 "--val-size", "32", "--test-size", "32", "--max-length", "32",
                 "--methods", "majority", "lora", "--ranks", "4,8", "--run-id", "stopped"]) == code
    err = capsys.readouterr().err
    name = signal.Signals(signum).name
    assert err.splitlines() == [f"loraflow: stopped by {name}; completed variants are kept: "
                                "`loraflow run --run-id stopped` with the same settings goes "
                                "on from them"]
    first, *others = [v for v in config.variants() if v.method == "lora"]
    record = MetricsRecord.read(paths.variant_dir(first.name) / "metrics.json")
    assert record.status == "failed" and f"stopped by {name}" in record.error
    assert MetricsRecord.read(paths.variant_dir("majority") / "metrics.json").ok
    assert others and not any(paths.variant_dir(v.name).exists() for v in others)  # stopped
    assert not (paths.report_dir / "report.html").exists()
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == handlers


def test_loraflow_stops_at_once_outside_a_variant(smoke_config, artifacts, monkeypatch, capsys):
    """A data step has no steps to check between: the CLI, which owns its process, stops
    wherever the signal finds it."""
    went_on: list[bool] = []

    def download(config, paths):
        _sigterm()
        went_on.append(True)

    monkeypatch.setattr("tasks.data.download_dataset", download)
    assert main(["run", "--preset", "smoke", "--data", smoke_config.data, "--train-size", "64",
                 "--val-size", "32", "--test-size", "32", "--max-length", "32",
                 "--methods", "majority", "--run-id", "early"]) == 143
    assert went_on == []
    err = capsys.readouterr().err
    assert err.startswith("loraflow: stopped by SIGTERM;") and len(err.splitlines()) == 1


@pytest.mark.slow  # a process of its own (imports torch): about 15 s
def test_a_sigterm_from_outside_stops_loraflow_step_train(smoke_config, artifacts, imdb_sample):
    """As Airflow sends it: from another process, while the variant trains."""
    import subprocess
    import sys
    import time

    from tasks.pipeline import prepare_run
    from tests.tasks.conftest import write_run_data

    config = dataclasses.replace(smoke_config, methods=("lora",), epochs=40)  # long enough
    paths = prepare_run(config, "sigterm", artifacts)
    write_run_data(paths, {s: imdb_sample[s].head(n) for s, n in
                           (("train", 64), ("validation", 32), ("test", 32))})
    tokenize_dataset(config, paths)
    variant = config.variants()[0]
    checkpoints = paths.variant_dir(variant.name) / "checkpoints"
    proc = subprocess.Popen([sys.executable, "-m", "tasks.cli", "step", "train", "--run-dir",
                             str(paths.run_dir), "--method", "lora"],
                            env={**os.environ, "LORAFLOW_PROGRESS": "0"},
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300  # a safety net, not what is tested
        while not list(checkpoints.glob("epoch-*")) and proc.poll() is None \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None, proc.communicate()
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 143, err
    assert err.splitlines() == ["loraflow: stopped by SIGTERM; completed variants are kept"]
    record = MetricsRecord.read(paths.variant_dir(variant.name) / "metrics.json")
    assert record.status == "failed" and "stopped by SIGTERM" in record.error
    assert not (paths.variant_dir(variant.name) / "adapter").exists()
    assert list(checkpoints.glob("epoch-*"))  # an epoch checkpoint, kept for a resume
