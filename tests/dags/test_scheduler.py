"""A real Airflow: API server, scheduler and DAG processor as separate processes
(LocalExecutor, SQLite in a throw-away home: the session's, tests/airflow_server.py), driven
only through the REST API v2, as a user's script or the web UI would. The DAG is scheduled
on its data asset, and notifies through a connection that the tests create, pointing at a
real SMTP server they start. The `gpu` pool has one slot, so the encoder variants (two LoRA
ranks and full fine-tuning) of a smoke sweep must run one after another. The tests run in
file order: the mailbox collects the messages of every run, checked at the end."""

from __future__ import annotations

import json
import socket
from datetime import datetime
from email import message_from_bytes
from email.policy import default as email_policy
from itertools import pairwise
from pathlib import Path
from urllib.parse import quote

import pytest

from tasks import assets
from tasks.paths import report_slug
from tasks.pipeline import config_from_params
from tests.airflow_server import NOTIFY_CONN, _wait
from tests.dags.conftest import DAG_ID

pytestmark = [pytest.mark.slow, pytest.mark.scheduler]
EXAMPLE_DAG = "loraflow_after_report_example"  # dags/examples/after_lora_report.py
RUN_IDS: dict[str, str] = {}  # what each test's run was, for the mailbox's final check


@pytest.fixture(scope="module")
def mailbox():
    """A real SMTP server on a free port; the list of messages it received."""
    from aiosmtpd.controller import Controller

    received = []

    class Mailbox:
        async def handle_DATA(self, server, session, envelope):  # noqa: N802
            received.append(message_from_bytes(envelope.content, policy=email_policy))
            return "250 OK"

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    controller = Controller(Mailbox(), hostname="127.0.0.1", port=port)
    controller.start()
    yield port, received
    controller.stop()


def _finish(airflow, run_id: str, timeout: float = 360) -> str:
    run_url = f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}"

    def finished():
        state = airflow.client.get(run_url).raise_for_status().json()["state"]
        return state if state in ("success", "failed") else None

    return _wait(f"run {run_id} to finish", finished, timeout=timeout, every=2)


def _failing_run(airflow, imdb_dir: Path) -> str:
    """A run that `prepare` refuses (its data folder does not exist): failed in seconds."""
    airflow.client.patch(f"/api/v2/dags/{DAG_ID}", json={"is_paused": False}).raise_for_status()
    created = airflow.trigger({"preset": "smoke", "data": str(imdb_dir.parent / "no-such-data")})
    assert created.status_code == 200, created.text
    run_id = created.json()["dag_run_id"]
    assert _finish(airflow, run_id, timeout=120) == "failed"
    return run_id


@pytest.mark.timeout(300)  # includes starting the components
def test_dag_starts_paused_and_unpauses_through_the_api(airflow):
    assert airflow.client.get(f"/api/v2/dags/{DAG_ID}").json()["is_paused"] is True
    dag = airflow.client.patch(f"/api/v2/dags/{DAG_ID}", json={"is_paused": False})
    assert dag.status_code == 200, dag.text
    assert dag.json()["is_paused"] is False
    # Scheduled on its data asset (LORAFLOW_SCHEDULE=asset): no time slot, and unpausing
    # starts nothing until the asset receives an event.
    assert dag.json()["next_dagrun_run_after"] is None
    assert dag.json()["timetable_summary"] == "Asset"
    assert airflow.runs() == []
    # The LocalExecutor forked its workers with the ML stack imported (tasks/preload.py).
    def preloaded():
        return [line for line in (airflow.home.parent / "scheduler.log").read_text().splitlines()
                if "loraflow: the LocalExecutor imported the ML stack" in line]

    said = _wait("the scheduler's LocalExecutor to start", preloaded, timeout=60)
    assert len(said) == 1 and "not imported" not in said[0], said


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


@pytest.mark.timeout(180)
def test_a_failed_run_notifies_nobody_without_the_connection(airflow, imdb_dir):
    run_id = RUN_IDS["failed, no connection"] = _failing_run(airflow, imdb_dir)

    def callback_done():  # the DAG processor ran the run's failure callback, which sent nothing
        logs = (airflow.home / "logs" / "dag_processor").rglob("lora_imdb_experiment.py.log")
        return any(f"no notification sent for run {run_id}" in log.read_text() for log in logs)

    _wait("the failure callback", callback_done, timeout=120)  # the mailbox is checked last


@pytest.mark.timeout(300)
def test_a_failed_run_sends_one_message_through_the_connection(airflow, imdb_dir, mailbox):
    port, received = mailbox
    extra = {"from_email": "loraflow@example.com", "to": "ml-team@example.com",
             "disable_ssl": True, "disable_tls": True}
    created = airflow.client.post("/api/v2/connections", json={
        "connection_id": NOTIFY_CONN, "conn_type": "smtp", "host": "127.0.0.1", "port": port,
        "extra": json.dumps(extra)})
    assert created.status_code == 201, created.text
    run_id = RUN_IDS["failed"] = _failing_run(airflow, imdb_dir)
    _wait_for_message(airflow, received, f"[loraflow] run {run_id} failed")


def _wait_for_message(airflow, received: list, subject: str, timeout: float = 150) -> None:
    try:
        _wait(f"the message {subject!r}", lambda: any(m["Subject"] == subject for m in received),
              timeout=timeout)
    except TimeoutError as err:
        raise AssertionError(f"{err}; the mailbox holds {[m['Subject'] for m in received]}; "
                             f"the DAG processor said:\n{airflow.callback_log()}") from None


@pytest.mark.timeout(480)
def test_a_data_asset_event_starts_a_smoke_sweep_whose_report_events_start_the_example(
        airflow, imdb_dir, mailbox):
    for dag_id in (DAG_ID, EXAMPLE_DAG):
        airflow.client.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False}).raise_for_status()
    params = {"preset": "smoke", "data": str(imdb_dir), "train_size": 64, "val_size": 32,
              "test_size": 32, "max_length": 32, "ranks": [2, 4],
              "methods": ["majority", "lora", "full_finetune"]}
    config = config_from_params(params)
    cpu = [v.name for v in config.method_variants(encoder=False)]
    gpu_names = [v.name for v in config.method_variants(encoder=True)]
    assert (cpu, len(gpu_names)) == (["majority"], 3)
    # What an upstream data pipeline would post once new data has landed.
    airflow.post_asset_event(assets.DATA["name"], {"params": params})
    [run] = _wait("the asset event to start a run", airflow.runs, timeout=60)
    run_id = RUN_IDS["success"] = run["dag_run_id"]
    assert run["run_type"] == "asset_triggered"
    state = _finish(airflow, run_id)

    run_url = f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}"
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

    assert [r["dag_run_id"] for r in airflow.runs()] == [run_id]  # no other run crept in
    run_dir = airflow.artifacts / "runs" / run_id
    records = {p.parent.name: json.loads(p.read_text()) for p in run_dir.glob("results/*/metrics.json")}
    assert set(records) == {v.name for v in config.variants()}
    assert all(r["status"] == "ok" for r in records.values())
    report = airflow.reports / report_slug(run_id) / "report.html"
    assert report.exists()

    # `report` emitted one event on each outlet asset, with the run's extras.
    [event] = airflow.asset_events(assets.REPORT["name"], source_run_id=run_id)
    extra = event["extra"]
    assert (extra["run_id"], extra["preset"], extra["regression"]) == (run_id, "smoke", False)
    assert extra["report_url"].endswith(f"/loraflow/reports/{report_slug(run_id)}/report.html")
    assert set(extra["selected"]) == {"majority", "lora", "full_finetune"}
    lora = extra["selected"]["lora"]
    summary = json.loads((report.parent / "summary.json").read_text())
    assert lora["configuration"] == summary["selected"]["lora"]["configuration"]
    assert 0 <= lora["validation_accuracy"] <= 1 and 0 <= lora["accuracy"] <= 1
    [adapter_event] = airflow.asset_events(assets.ADAPTER["name"], source_run_id=run_id)
    adapter = Path(adapter_event["extra"]["adapter_path"])
    assert adapter.parent.name.startswith(lora["configuration"])
    assert (adapter / "adapter_config.json").exists()

    # The example DAG, scheduled on the report asset, ran after it and read its extras.
    example = f"/api/v2/dags/{EXAMPLE_DAG}/dagRuns"

    def example_done():
        runs = airflow.client.get(example).raise_for_status().json()["dag_runs"]
        return [r for r in runs if r["state"] in ("success", "failed")]

    [done] = _wait("the example DAG's run", example_done, timeout=90, every=2)
    assert done["state"] == "success" and done["run_type"] == "asset_triggered"
    xcom = airflow.client.get(f"{example}/{quote(done['dag_run_id'], safe='')}/taskInstances/"
                              "read_report_event/xcomEntries/return_value")
    value = xcom.raise_for_status().json()["value"]
    value = json.loads(value) if isinstance(value, str) else value
    assert value["run_id"] == run_id and value["report_url"] == extra["report_url"]


@pytest.mark.timeout(180)
def test_the_mailbox_holds_one_message_per_run_with_the_connection(airflow, mailbox):
    _, received = mailbox
    assert set(RUN_IDS) == {"failed, no connection", "failed", "success"}, RUN_IDS
    _wait_for_message(airflow, received, f"[loraflow] run {RUN_IDS['success']} succeeded")
    subjects = sorted(m["Subject"] for m in received)
    assert subjects == sorted([f"[loraflow] run {RUN_IDS['failed']} failed",
                               f"[loraflow] run {RUN_IDS['success']} succeeded"])
    success = next(m for m in received if "succeeded" in m["Subject"])
    body = success.get_body(("html", "plain")).get_content()
    assert f"/loraflow/reports/{report_slug(RUN_IDS['success'])}/report.html" in body
    assert success["To"] == "ml-team@example.com"
    failed = next(m for m in received if "failed" in m["Subject"])
    text = failed.get_body(("html", "plain")).get_content()
    assert "The run stopped in prepare (try 1): the run cannot start" in text
    assert "no-such-data" in text and "No report was written" in text
