"""The whole DAG through Airflow's `dag.test()` (every task in this process, real steps) on
the smoke preset, shrunk further through the run conf: one run with a broken variant, read
by two tests, and one conf refused in `prepare`."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import pytest

from tasks.paths import report_slug
from tasks.pipeline import config_from_params

SMALL = {"train_size": 64, "val_size": 32, "test_size": 32, "max_length": 32}


def _task_states(dag_run) -> dict[tuple[str, int], str]:
    return {(ti.task_id, ti.map_index): ti.state for ti in dag_run.get_task_instances()}


def _metrics(run_dir: Path) -> dict[str, dict]:
    return {p.parent.name: json.loads(p.read_text())
            for p in sorted((run_dir / "results").glob("*/metrics.json"))}


BROKEN = "lora_r2_qkvo_lr2e-3_s42"  # the variant whose training breaks on purpose


@dataclass(frozen=True)
class DagTest:
    dag_run: object
    conf: dict
    artifacts: Path
    reports: Path


@pytest.fixture(scope="module")
def smoke_run_with_a_broken_variant(dag, airflow_db, imdb_dir, tmp_path_factory):
    """One `dag.test()` of the smoke preset (every method, two LoRA ranks) in which one
    variant fails, read by the tests below; the run that succeeds as a whole is the real
    Airflow's (test_scheduler.py).

    Preflight (in `prepare`) refuses what it can see before training: unknown targets,
    ranks, models. What remains is a failure inside one variant's training; dag.test()
    runs every task in this process, so one variant is broken here with a ValueError,
    which the retry policy fails at once instead of retrying."""
    import tasks.train

    root = tmp_path_factory.mktemp("dag-test")
    real_train = tasks.train.train_variant

    def train_variant(job, module, **kwargs):
        if job.variant.name == BROKEN:
            raise ValueError(f"{BROKEN}: its training broke on purpose")
        return real_train(job, module, **kwargs)

    conf = {"preset": "smoke", "data": str(imdb_dir), **SMALL, "ranks": [2, 4]}
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LORAFLOW_ARTIFACTS", str(root / "artifacts"))
        patch.setenv("LORAFLOW_REPORTS", str(root / "reports"))
        patch.setattr(tasks.train, "train_variant", train_variant)
        dag_run = dag.test(run_conf=conf)
    return DagTest(dag_run, conf, root / "artifacts", root / "reports")


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_smoke_run_writes_every_variant_and_the_report(smoke_run_with_a_broken_variant):
    run = smoke_run_with_a_broken_variant
    dag_run = run.dag_run
    config = config_from_params(run.conf)
    gpu = [v.name for v in config.method_variants(encoder=True)]
    states = _task_states(dag_run)
    failed = {("gpu_variants", gpu.index(BROKEN)), ("check_variants", -1)}
    assert all(s in ("success", "skipped") for k, s in states.items() if k not in failed), states
    for task, encoder in (("cpu_variants", False), ("gpu_variants", True)):
        n = len(config.method_variants(encoder=encoder))
        assert sorted(i for (t, i) in states if t == task) == list(range(n)), task

    run_dir = run.artifacts / "runs" / dag_run.run_id
    metrics = _metrics(run_dir)
    assert set(metrics) == {v.name for v in config.variants()}
    assert {"lora_r2_qkvo_lr2e-3_s42", "lora_r4_qkvo_lr2e-3_s42"} <= set(metrics)
    for variant, record in metrics.items():
        if variant == BROKEN:
            continue  # the next test
        assert record["status"] in ("ok", "not_applicable"), (variant, record.get("error"))
        if record["status"] == "ok":
            assert 0.0 <= record["accuracy"] <= 1.0 and record["validation_examples"] == 32
    assert json.loads((run_dir / "config.json").read_text())["ranks"] == [2, 4]
    report = run.reports / report_slug(dag_run.run_id) / "report.html"
    assert report.stat().st_size > 10_000
    assert "lora_r4_qkvo_lr2e-3_s42" in report.read_text()


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_a_failed_variant_fails_once_still_gets_a_report_and_fails_the_run(
        smoke_run_with_a_broken_variant):
    run = smoke_run_with_a_broken_variant
    dag_run = run.dag_run
    gpu = [v.name for v in config_from_params(run.conf).method_variants(encoder=True)]
    assert gpu == ["zero_shot", "seed_heuristic", "linear_probe", "lora_r2_qkvo_lr2e-3_s42",
                   "lora_r4_qkvo_lr2e-3_s42", "full_finetune_lr5e-4_s42",
                   "bitfit_lr2e-3_s42"]  # map indexes 0 to 6
    tis = {(ti.task_id, ti.map_index): ti for ti in dag_run.get_task_instances()}
    assert dag_run.state == "failed"
    assert [tis[("gpu_variants", i)].state for i in range(len(gpu))] == [
        "failed" if name == BROKEN else "success" for name in gpu]
    assert tis[("gpu_variants", gpu.index(BROKEN))].try_number == 1  # not retried
    assert tis[("cpu_variants", 0)].state == "success"
    assert tis[("report", -1)].state == "success"
    assert tis[("check_variants", -1)].state == "failed"
    metrics = _metrics(run.artifacts / "runs" / dag_run.run_id)
    assert metrics["lora_r4_qkvo_lr2e-3_s42"]["status"] == "ok"
    assert metrics["full_finetune_lr5e-4_s42"]["status"] == "ok"
    assert metrics[BROKEN]["status"] == "failed"
    assert "its training broke on purpose" in metrics[BROKEN]["error"]
    report = run.reports / report_slug(dag_run.run_id) / "report.html"
    assert BROKEN in report.read_text()


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_a_conf_the_schema_allows_but_the_config_refuses_fails_in_prepare(
        dag, airflow_db, artifacts, imdb_dir):
    # `rank` (not `ranks`) passes the params schema, which allows extra keys, but
    # ExperimentConfig refuses it: the run must stop in `prepare`, before any data step.
    dag_run = dag.test(run_conf={"preset": "smoke", "data": str(imdb_dir), "rank": 8})

    states = _task_states(dag_run)
    assert dag_run.state == "failed"
    assert states[("prepare", -1)] == "failed"
    assert states[("report", -1)] == "skipped"
    assert states[("check_regression", -1)] in ("skipped", "upstream_failed")
    assert all(s == "upstream_failed" for (t, _), s in states.items()
               if t not in ("prepare", "report", "check_variants", "check_regression")), states
    assert not (artifacts / "runs").exists()  # nothing was written
    # ...but why it stopped is recorded, for check_variants (which fails saying so) and the
    # Report tab
    from tasks import failures

    assert states[("check_variants", -1)] == "failed"
    assert failures.read(dag_run.run_id)["error"].startswith("unknown config fields ['rank']")
