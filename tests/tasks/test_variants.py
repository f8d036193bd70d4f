"""run_variant's lifecycle: a method that cannot run on the model is recorded as not
applicable (and the run goes on, exit code 0); a method that fails is recorded as failed
and re-raised."""

from __future__ import annotations

import json
import shutil

import pytest

from tasks.cli import main
from tasks.job import NotApplicable
from tasks.methods import majority, seed_heuristic
from tasks.metrics import MetricsRecord
from tasks.pipeline import prepare_run
from tasks.registry import Variant
from tasks.variants import run_variant

REASON = "the encoder has random weights: nothing to read off it"


def _not_applicable(job):
    raise NotApplicable(REASON)


def _broken(job):
    raise RuntimeError("the method blew up")


def test_not_applicable_is_recorded_with_its_reason_and_not_raised(run, monkeypatch):
    config, paths = run
    monkeypatch.setattr(seed_heuristic, "predict", _not_applicable)
    path = run_variant(Variant("seed_heuristic"), config, paths, device="cpu")
    record = MetricsRecord.read(path)
    assert record.status == "not_applicable" and record.reason == REASON
    assert record.error is None and record.finished_at and record.accuracy is None
    assert not (paths.variant_dir("seed_heuristic") / "predictions.parquet").exists()


def test_a_failing_method_is_recorded_as_failed_and_re_raised(run, monkeypatch):
    config, paths = run
    monkeypatch.setattr(majority, "predict", _broken)
    with pytest.raises(RuntimeError, match="blew up"):
        run_variant(Variant("majority"), config, paths)
    record = MetricsRecord.read(paths.variant_dir("majority") / "metrics.json")
    assert record.status == "failed" and record.error == "RuntimeError: the method blew up"
    assert "_broken" in record.traceback and record.device == "cpu"


def test_run_variant_records_the_device_and_the_configs_model(run):
    config, paths = run
    record = MetricsRecord.read(run_variant(Variant("majority"), config, paths))
    assert (record.device, record.model, record.preset) == ("cpu", config.model, "smoke")


def _cli_run(tmp_path, imdb_dir, run_id: str) -> int:
    return main(["run", "--preset", "smoke", "--data", str(imdb_dir), "--train-size", "64",
                 "--val-size", "32", "--test-size", "32", "--max-length", "32",
                 "--methods", "majority", "seed_heuristic", "--run-id", run_id,
                 "--artifacts", str(tmp_path / "a"), "--reports", str(tmp_path / "r")])


@pytest.mark.slow  # a whole run in this process
def test_a_not_applicable_method_keeps_the_runs_exit_code_zero(tmp_path, imdb_dir, monkeypatch,
                                                              capsys):
    monkeypatch.setattr(seed_heuristic, "predict", _not_applicable)
    assert _cli_run(tmp_path, imdb_dir, "na-run") == 0
    out, err = capsys.readouterr()
    assert "warning" not in err and out.strip().splitlines()[-1].startswith("report: ")
    results = tmp_path / "a" / "runs" / "na-run" / "results"
    stored = json.loads((results / "seed_heuristic" / "metrics.json").read_text())
    assert (stored["status"], stored["reason"]) == ("not_applicable", REASON)
    assert json.loads((results / "majority" / "metrics.json").read_text())["status"] == "ok"
    html = (tmp_path / "r" / "na-run" / "report.html").read_text()
    assert "Not applicable to this model: notebook heuristic (" + REASON in html
    summary = json.loads((tmp_path / "r" / "na-run" / "summary.json").read_text())
    assert summary["counts"] == {"ok": 1, "not_applicable": 1}


@pytest.mark.slow  # a whole run in this process
def test_a_failed_method_makes_the_run_exit_non_zero_and_names_it(tmp_path, imdb_dir,
                                                                  monkeypatch, capsys):
    monkeypatch.setattr(majority, "predict", _broken)
    assert _cli_run(tmp_path, imdb_dir, "failed-run") == 1
    err = capsys.readouterr().err
    assert "1 variant(s) failed: majority" in err
    results = tmp_path / "a" / "runs" / "failed-run" / "results"
    assert json.loads((results / "seed_heuristic" / "metrics.json").read_text())["status"] == "ok"
    assert (tmp_path / "r" / "failed-run" / "report.html").exists()


def test_the_precision_setting_is_resolved_once_and_carried_in_the_job(run, monkeypatch):
    """`auto` is decided once per variant, where its device is known; the method gets the
    answer in its Job and the record says what was used."""
    import torch

    from tasks import evaluate

    config, paths = run
    jobs, resolved = [], []
    real = evaluate.resolve_precision

    def capture(job):
        jobs.append(job)
        raise NotApplicable("captured")

    monkeypatch.setattr(evaluate, "resolve_precision",
                        lambda setting, device, tokens=None: resolved.append((setting, device))
                        or real(setting, device, tokens))
    monkeypatch.setattr(seed_heuristic, "predict", capture)
    monkeypatch.setattr(majority, "predict", capture)
    run_variant(Variant("seed_heuristic"), config, paths, device="cpu")
    run_variant(Variant("majority"), config, paths)
    assert config.precision == "auto" and resolved == [("auto", "cpu")]  # majority: no encoder
    encoder_job, numpy_job = jobs
    assert encoder_job.precision == real("auto", "cpu")
    assert encoder_job.dtype == {"fp32": None, "bf16": torch.bfloat16}[encoder_job.precision]
    assert (numpy_job.precision, numpy_job.dtype) == ("fp32", None)
    record = MetricsRecord.read(paths.variant_dir("seed_heuristic") / "metrics.json")
    assert record.precision == encoder_job.precision
    assert MetricsRecord.read(paths.variant_dir("majority") / "metrics.json").precision is None


def test_a_job_refuses_an_unresolved_precision(run):
    from tasks.job import Job

    config, paths = run
    record = MetricsRecord.start(Variant("majority"), config.model, config.preset)
    with pytest.raises(ValueError, match="resolved precision.*'auto'"):
        Job(Variant("majority"), config, paths, record, "cpu", "auto")


# --- a complete variant is kept; a forced rerun that fails keeps it too ----------------------

LORA = Variant("lora", rank=4, targets="qkvo", lr=2e-3, seed=1)


def _stand_in_training(calls: list, fail: BaseException | None = None):
    """tasks.train.train_variant without torch: an adapter/ and constant predictions, or
    `fail` raised once the adapter is written (as a stop after saving would)."""
    import numpy as np

    from tasks.job import Predictions
    from tasks.variants import labels

    def train_variant(job, module, **kwargs):
        calls.append(job.variant.name)
        (job.out / "adapter").mkdir(parents=True, exist_ok=True)
        (job.out / "adapter" / "adapter_model.safetensors").write_bytes(b"try %d" % len(calls))
        if fail is not None:
            raise fail
        return Predictions(np.full(len(labels(job.paths, "validation")), 0.7),
                           np.full(len(labels(job.paths, "test")), 0.3))

    return train_variant


def test_a_complete_variant_is_not_run_again_and_the_log_says_how_to_force(run, monkeypatch,
                                                                           caplog):
    """Rerunning a finished run used to run every variant again: a failure (or a stop)
    then replaced an `ok` record. A complete variant is now kept, and its task's log says
    why and how to run it again."""
    config, paths = run
    first = run_variant(Variant("majority"), config, paths)
    stored = first.read_bytes()
    monkeypatch.setattr(majority, "predict", _broken)
    with caplog.at_level("INFO", logger="tasks.variants"):
        assert run_variant(Variant("majority"), config, paths, attempt=2) == first
    assert first.read_bytes() == stored  # the same record, attempt 1
    said = caplog.text
    assert "majority is already complete (ok" in said and "not run again" in said
    assert f"delete {paths.variant_dir('majority')}" in said and "--force" in said


def test_a_forced_rerun_that_fails_keeps_the_complete_result_and_records_the_failure(
        run, monkeypatch, caplog):
    import tasks.train

    config, paths = run
    out = paths.variant_dir(LORA.name)
    calls: list[str] = []
    monkeypatch.setattr(tasks.train, "train_variant", _stand_in_training(calls))
    run_variant(LORA, config, paths, device="cpu")
    before = {name: (out / name).read_bytes() for name in
              ("metrics.json", "predictions.parquet", "adapter/adapter_model.safetensors")}
    run_variant(LORA, config, paths, device="cpu")  # complete: skipped
    assert calls == [LORA.name]

    monkeypatch.setattr(tasks.train, "train_variant",
                        _stand_in_training(calls, RuntimeError("the GPU fell off the bus")))
    with caplog.at_level("WARNING", logger="tasks.variants"), \
            pytest.raises(RuntimeError, match="fell off"):
        run_variant(LORA, config, paths, device="cpu", attempt=2, force=True)
    assert len(calls) == 2  # forced: it did run
    after = {name: (out / name).read_bytes() for name in before}
    assert after == before  # record, predictions and adapter: the complete result, untouched
    failed = MetricsRecord.read(out / "failed-attempt.json")
    assert (failed.status, failed.attempt) == ("failed", 2)
    assert failed.error == "RuntimeError: the GPU fell off the bus"
    assert "the earlier result (ok) is kept" in caplog.text
    assert not (paths.run_dir / ".kept" / LORA.name).exists()


def test_a_forced_rerun_that_succeeds_replaces_the_result(run, monkeypatch):
    import tasks.train

    config, paths = run
    calls: list[str] = []
    monkeypatch.setattr(tasks.train, "train_variant", _stand_in_training(calls))
    run_variant(LORA, config, paths, device="cpu")
    run_variant(LORA, config, paths, device="cpu", attempt=2, force=True)
    out = paths.variant_dir(LORA.name)
    assert MetricsRecord.read(out / "metrics.json").attempt == 2
    assert (out / "adapter" / "adapter_model.safetensors").read_bytes() == b"try 2"
    assert not (paths.run_dir / ".kept" / LORA.name).exists()


def test_an_ok_record_without_its_adapter_or_predictions_is_run_again(run, monkeypatch):
    import tasks.train

    config, paths = run
    calls: list[str] = []
    monkeypatch.setattr(tasks.train, "train_variant", _stand_in_training(calls))
    out = paths.variant_dir(LORA.name)
    run_variant(LORA, config, paths, device="cpu")
    shutil.rmtree(out / "adapter")
    run_variant(LORA, config, paths, device="cpu")
    (out / "predictions.parquet").unlink()
    run_variant(LORA, config, paths, device="cpu")
    assert len(calls) == 3
    assert (out / "adapter").is_dir() and (out / "predictions.parquet").is_file()


def test_a_result_set_aside_by_a_killed_forced_rerun_is_put_back(run, monkeypatch):
    """A forced rerun sets the complete result aside while it runs; if its process is
    killed (SIGKILL: nothing can run), the next call puts it back before anything else."""
    import tasks.train

    config, paths = run
    calls: list[str] = []
    monkeypatch.setattr(tasks.train, "train_variant", _stand_in_training(calls))
    out = paths.variant_dir(LORA.name)
    run_variant(LORA, config, paths, device="cpu")
    stored = (out / "metrics.json").read_bytes()
    kept = paths.run_dir / ".kept" / LORA.name
    kept.parent.mkdir()
    out.rename(kept)  # what the killed rerun left: the result aside, a half-written folder
    (out / "checkpoints" / "epoch-001").mkdir(parents=True)
    run_variant(LORA, config, paths, device="cpu")
    assert calls == [LORA.name]  # put back, complete, so not run again
    assert (out / "metrics.json").read_bytes() == stored and not kept.exists()
    assert (out / "checkpoints" / "epoch-001").is_dir()  # kept for a resume


def test_loraflow_run_again_keeps_complete_variants_unless_forced(smoke_config, artifacts,
                                                                   imdb_sample, monkeypatch,
                                                                   capsys):
    import dataclasses

    import tasks.pipeline
    from tests.tasks.conftest import write_run_data

    config = dataclasses.replace(smoke_config, methods=("majority",))
    write_run_data(prepare_run(config, "again", artifacts), imdb_sample)
    monkeypatch.setattr(tasks.pipeline, "DATA_STEPS", ())  # the data is there: skip its steps

    def cli(*extra: str) -> int:
        return main(["run", "--preset", "smoke", "--data", config.data, "--train-size", "64",
                     "--val-size", "32", "--test-size", "32", "--max-length", "32",
                     "--methods", "majority", "--run-id", "again", *extra])

    assert cli() == 0
    metrics = artifacts / "runs" / "again" / "results" / "majority" / "metrics.json"
    stored = metrics.read_bytes()
    monkeypatch.setattr(majority, "predict", _broken)
    capsys.readouterr()
    assert cli() == 0 and metrics.read_bytes() == stored  # kept, not run again
    assert ("kept: 1 variant(s) complete from before, not run again (--force runs them again)"
            in capsys.readouterr().out)
    assert cli("--force") == 1  # run again: it failed, and the earlier result is kept
    assert metrics.read_bytes() == stored
    assert ("1 variant(s) failed: majority (its rerun; the earlier result is kept)"
            in capsys.readouterr().err)
    assert (metrics.parent / "failed-attempt.json").exists()


def test_run_help_documents_force(capsys):
    with pytest.raises(SystemExit):
        main(["run", "--help"])
    assert "--force" in capsys.readouterr().out
