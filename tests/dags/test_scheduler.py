"""A real Airflow: API server, scheduler and DAG processor as separate processes
(LocalExecutor, SQLite in a throw-away home: the session's, tests/airflow_server.py), driven
only through the REST API v2, as a user's script or the web UI would. The `gpu` pool has
one slot, so the encoder variants (two LoRA ranks and full fine-tuning) of a smoke sweep
must run one after another."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from itertools import pairwise
from urllib.parse import quote

import pytest

from tasks.paths import report_slug
from tasks.pipeline import config_from_params
from tests.airflow_server import _wait
from tests.dags.conftest import DAG_ID

pytestmark = [pytest.mark.slow, pytest.mark.scheduler]


@pytest.mark.timeout(300)  # includes starting the components
def test_dag_starts_paused_and_unpauses_through_the_api(airflow):
    dag = airflow.client.patch(f"/api/v2/dags/{DAG_ID}", json={"is_paused": False})
    assert dag.status_code == 200, dag.text
    assert dag.json()["is_paused"] is False
    # Weekly, and the first scheduled run is the next slot, not one started right now.
    next_run = datetime.fromisoformat(dag.json()["next_dagrun_run_after"])
    assert next_run > datetime.now(UTC)


@pytest.mark.parametrize("conf, field", [
    ({"preset": "smoke", "ranks": [0]}, "ranks"),
    ({"preset": "nope"}, "preset"),
    ({"preset": "smoke", "methods": ["linear_probe_typo"]}, "methods"),
])
def test_invalid_conf_is_refused_at_trigger_time(airflow, conf, field):
    response = airflow.trigger(conf)
    assert response.status_code == 400, response.text
    assert f"Invalid input for param {field}" in response.json()["detail"]
    assert airflow.runs() == []  # no run was created, so no task ran


@pytest.mark.timeout(420)
def test_smoke_sweep_succeeds_and_gpu_tasks_never_overlap(airflow, imdb_dir):
    airflow.client.patch(f"/api/v2/dags/{DAG_ID}", json={"is_paused": False}).raise_for_status()
    conf = {"preset": "smoke", "data": str(imdb_dir), "train_size": 64, "val_size": 32,
            "test_size": 32, "max_length": 32, "ranks": [2, 4],
            "methods": ["majority", "lora", "full_finetune"]}
    config = config_from_params(conf)
    cpu = [v.name for v in config.method_variants(encoder=False)]
    gpu_names = [v.name for v in config.method_variants(encoder=True)]
    assert (cpu, len(gpu_names)) == (["majority"], 3)
    created = airflow.trigger(conf)
    assert created.status_code == 200, created.text
    run_id = created.json()["dag_run_id"]  # manual__<time>: ':' and '+' need quoting
    run_url = f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}"

    def finished():
        state = airflow.client.get(run_url).raise_for_status().json()["state"]
        return state if state in ("success", "failed") else None

    state = _wait("the DAG run to finish", finished, timeout=360, every=2)
    tis = airflow.client.get(f"{run_url}/taskInstances", params={"limit": 100}).raise_for_status()
    tis = tis.json()["task_instances"]
    states = {(t["task_id"], t["map_index"]): t["state"] for t in tis}
    assert state == "success", states
    single = {"prepare", "plan_cpu_variants", "plan_gpu_variants", "download_dataset",
              "validate_dataset", "tokenize", "report", "check_regression"}
    assert {t for t, s in states.items() if s == "success"} == (
        {(t, -1) for t in single} | {("cpu_variants", 0)}
        | {("gpu_variants", i) for i in range(len(gpu_names))})
    assert states[("check_variants", -1)] == "skipped"  # no variant failed

    cpu_tis = [t for t in tis if t["task_id"] == "cpu_variants"]
    assert [(t["pool"], t["queue"], t["rendered_map_index"]) for t in cpu_tis] == [
        ("default_pool", "default", "majority")]
    gpu = sorted((t for t in tis if t["task_id"] == "gpu_variants"),
                 key=lambda t: t["start_date"])
    assert len(gpu) == 3 and all((t["pool"], t["queue"]) == ("gpu", "gpu") for t in gpu)
    assert {t["rendered_map_index"] for t in gpu} == set(gpu_names)
    at = datetime.fromisoformat
    # They competed: all three were scheduled (ready to run) before the first one ended...
    assert max(at(t["scheduled_when"]) for t in gpu) < at(gpu[0]["end_date"])
    # ...yet with one slot in the pool they ran strictly one after another.
    for before, after in pairwise(gpu):
        assert at(after["start_date"]) >= at(before["end_date"]), (before, after)

    assert [r["dag_run_id"] for r in airflow.runs()] == [run_id]  # no scheduled run crept in
    run_dir = airflow.artifacts / "runs" / run_id
    records = {p.parent.name: json.loads(p.read_text()) for p in run_dir.glob("results/*/metrics.json")}
    assert set(records) == {v.name for v in config.variants()}
    assert all(r["status"] == "ok" for r in records.values())
    assert (airflow.reports / report_slug(run_id) / "report.html").exists()
