"""What check_variants and the Report tab say when a run stopped before its variants, or
when variants failed: tasks.failures."""

from __future__ import annotations

import pytest

from tasks import failures
from tasks.metrics import MetricsRecord
from tasks.paths import RunPaths
from tasks.registry import Variant

RUN_ID = "manual__2026-11-29T13:23:57+00:00"


def test_a_failing_step_records_its_error_and_a_later_success_removes_it(artifacts):
    with pytest.raises(ValueError), failures.recorded(RUN_ID, "prepare", attempt=1):
        raise ValueError("unknown config fields ['lora_rl']")
    record = failures.read(RUN_ID)
    assert (record["step"], record["attempt"], record["type"]) == ("prepare", 1, "ValueError")
    assert failures.what_failed(RUN_ID, None) == (
        "The run stopped in prepare (try 1): unknown config fields ['lora_rl']. No variant ran."
        " There is no report: the run folder was never made.")

    with failures.recorded(RUN_ID, "download_dataset", attempt=2):
        pass  # another step's success leaves prepare's record alone
    assert failures.read(RUN_ID)["step"] == "prepare"
    with failures.recorded(RUN_ID, "prepare", attempt=2):
        pass
    assert failures.read(RUN_ID) is None


def test_a_failed_data_step_is_named_with_its_error(artifacts):
    with pytest.raises(OSError), failures.recorded(RUN_ID, "download_dataset", attempt=3):
        raise OSError("connection reset")
    message = failures.what_failed(RUN_ID, str(artifacts / "runs" / "x"))
    assert message.startswith("The run stopped in download_dataset (try 3): connection reset.")
    assert "The report lists the variants as not run." in message


def test_failed_variants_are_named_when_no_step_failed(smoke_run):
    config, paths = smoke_run
    ok, bad = Variant("majority"), Variant("lora", rank=4, targets="qkvo", lr=2e-3, seed=42)
    record = MetricsRecord.start(ok, config.model, config.preset)
    record.status = "ok"
    record.write(paths)
    MetricsRecord.start(bad, config.model, config.preset).fail(paths, RuntimeError("CUDA OOM"))
    assert failures.what_failed(paths.run_id, str(paths.run_dir)) == (
        f"1 variant(s) did not finish: {bad.name} (failed). Their errors are in the report "
        "and in results/<variant>/metrics.json.")


def test_prepare_failing_without_a_record_still_says_no_variant_ran(artifacts):
    assert failures.what_failed("other-run", None).startswith("prepare failed (its log says why)")
    assert "failed without recording why" in failures.what_failed(
        "other-run", str(RunPaths.for_run("other-run", artifacts).run_dir))


def test_check_variants_names_prepares_problems_each_on_its_line_then_what_follows(
        artifacts, imdb_dir, monkeypatch):
    """`prepare` refused the run (as the DAG's prepare task records it): the message gives
    its error whole, then, on a line of its own, that no variant ran and there is no
    report. It used to glue "No variant ran." onto the last problem, after a double
    period when that problem ended with one (the hub's message does)."""
    from tasks.config import preset_config
    from tasks.pipeline import prepare_run

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    config = preset_config("smoke", data=str(imdb_dir), model="no/such-model", targets=["foo"])
    with pytest.raises(ValueError), failures.recorded(RUN_ID, "prepare", attempt=1):
        prepare_run(config, RUN_ID)
    message = failures.what_failed(RUN_ID, None)
    first, problem, verdict = message.splitlines()
    assert first == "The run stopped in prepare (try 1): the run cannot start:"
    assert problem.startswith("  - model 'no/such-model' not found: ")
    assert problem.endswith(".") and ".." not in message  # one period, the closing one
    assert verdict == ("No variant ran. There is no report: the run folder was never made.")
    assert not (artifacts / "runs").exists()  # which is so


def test_an_error_ending_with_a_period_gets_no_second_one(artifacts):
    with pytest.raises(OSError), failures.recorded(RUN_ID, "download_dataset", attempt=2):
        raise OSError("the mirror is down.")
    assert failures.what_failed(RUN_ID, str(artifacts / "runs" / "x")).startswith(
        "The run stopped in download_dataset (try 2): the mirror is down. No variant ran.")
