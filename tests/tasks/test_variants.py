"""run_variant's lifecycle: a method that cannot run on the model is recorded as not
applicable (and the run goes on, exit code 0); a method that fails is recorded as failed
and re-raised."""

from __future__ import annotations

import json

import pytest

from tasks.cli import main
from tasks.job import NotApplicable
from tasks.methods import majority, seed_heuristic
from tasks.metrics import MetricsRecord
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
