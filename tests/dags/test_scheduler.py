"""A real Airflow: API server, scheduler and DAG processor as separate processes
(LocalExecutor, SQLite in a throw-away home), driven only through the REST API v2, as a
user's script or the web UI would. The `gpu` pool has one slot, so the encoder variants
(two LoRA ranks and full fine-tuning) of a smoke sweep must run one after another. The DAG
is scheduled on its data asset and notifies through a connection that the tests create
only after the first runs, pointing at a real SMTP server (aiosmtpd) started here.

`LORAFLOW_TEST_PORT_BASE` (e.g. 9160) puts the API server, the log servers and the SMTP
server on that port and the next three, instead of free ports the OS picks."""

from __future__ import annotations

import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from email import message_from_bytes
from email.message import EmailMessage
from email.policy import default as email_policy
from itertools import pairwise
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import pytest

from tasks.paths import report_slug
from tasks.pipeline import config_from_params
from tests.dags.conftest import DAG_ID, airflow_env

pytestmark = [pytest.mark.slow, pytest.mark.scheduler]

COMPONENTS = ("api-server", "scheduler", "dag-processor")
NOTIFY_CONN_ID = "loraflow_notify"
EXAMPLE_DAG_ID = "loraflow_after_report_example"


def _free_port(offset: int = 0) -> int:
    if base := os.environ.get("LORAFLOW_TEST_PORT_BASE"):
        return int(base) + offset
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait(what: str, check, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if result := check():
                return result
        except httpx.TransportError:
            pass
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


@dataclass
class Airflow:
    url: str
    client: httpx.Client
    home: Path
    artifacts: Path
    reports: Path
    smtp: Any  # the SMTP server's handler: .messages, every message received

    def trigger(self, conf: dict) -> httpx.Response:
        return self.client.post(f"/api/v2/dags/{DAG_ID}/dagRuns",
                                json={"logical_date": None, "conf": conf})

    def runs(self) -> list[dict]:
        return self.client.get(f"/api/v2/dags/{DAG_ID}/dagRuns").raise_for_status().json()["dag_runs"]


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


class _Mailbox:
    """aiosmtpd handler: keeps every message it receives."""

    def __init__(self) -> None:
        self.messages: list[EmailMessage] = []

    async def handle_DATA(self, server, session, envelope):  # noqa: N802 (aiosmtpd's name)
        self.messages.append(message_from_bytes(envelope.content, policy=email_policy))
        return "250 OK"

    def about(self, run_id: str) -> list[EmailMessage]:
        return [m for m in self.messages if run_id in str(m["Subject"])]


@pytest.fixture(scope="module")
def smtp():
    from aiosmtpd.controller import Controller

    mailbox = _Mailbox()
    controller = Controller(mailbox, hostname="127.0.0.1", port=_free_port(3))
    controller.start()
    try:
        yield controller.port, mailbox
    finally:
        controller.stop()


@pytest.fixture(scope="module")
def airflow(tmp_path_factory, smtp):
    """Start the three components; stop them (whole process groups, so LocalExecutor
    workers and running tasks go too) when the module's tests are done."""
    root = tmp_path_factory.mktemp("airflow-cluster")
    home, port = root / "home", _free_port()
    home.mkdir()
    url = f"http://127.0.0.1:{port}"
    password = secrets.token_urlsafe(16)
    # The simple auth manager keeps its users' passwords in this file; writing it first
    # gives `admin` a password the test knows.
    (home / "simple_auth_manager_passwords.json.generated").write_text(json.dumps({"admin": password}))
    env = airflow_env(
        AIRFLOW_HOME=str(home),
        AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{home}/airflow.db",
        AIRFLOW__CORE__EXECUTOR="LocalExecutor",
        AIRFLOW__CORE__PARALLELISM="3",  # room for 3 tasks at once: the pool must hold them back
        AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS="admin:admin",
        AIRFLOW__API_AUTH__JWT_SECRET=secrets.token_urlsafe(32),  # shared by every component
        AIRFLOW__API__HOST="127.0.0.1",
        AIRFLOW__API__PORT=str(port),
        AIRFLOW__API__BASE_URL=url,
        AIRFLOW__API__WORKERS="1",
        AIRFLOW__CORE__EXECUTION_API_SERVER_URL=f"{url}/execution/",
        AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(_free_port(1)),  # not 8793: may be taken
        AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT=str(_free_port(2)),  # not 8794
        LORAFLOW_SCHEDULE="asset",  # a run starts when the data asset receives an event
        LORAFLOW_NOTIFY_CONN_ID=NOTIFY_CONN_ID,  # the connection itself comes later
        LORAFLOW_DEADLINE_HOURS="2",
        AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC="2",
        LORAFLOW_ARTIFACTS=str(root / "artifacts"),
        LORAFLOW_REPORTS=str(root / "reports"),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",  # 3 task processes on a 2-core machine: no thread oversubscription
    )
    env.pop("LORAFLOW_DEVICE", None)
    airflow_cli = [sys.executable, "-m", "airflow"]
    subprocess.run([*airflow_cli, "db", "migrate"], env=env, check=True, capture_output=True, timeout=300)
    subprocess.run([*airflow_cli, "pools", "set", "gpu", "1", "one GPU"], env=env, check=True,
                   capture_output=True, timeout=120)

    procs: dict[str, subprocess.Popen] = {}
    logs = {name: root / f"{name}.log" for name in COMPONENTS}
    client = httpx.Client(base_url=url, timeout=30)
    try:
        for name in COMPONENTS:
            with open(logs[name], "wb") as log:
                procs[name] = subprocess.Popen([*airflow_cli, name], env=env, stdout=log,
                                               stderr=subprocess.STDOUT, start_new_session=True)

        def api_up():
            for name, proc in procs.items():
                if proc.poll() is not None:
                    raise RuntimeError(f"airflow {name} exited:\n{_tail(logs[name])}")
            return client.get("/api/v2/monitor/health").status_code == 200

        _wait("the API server", api_up, timeout=240)  # minutes on a loaded machine
        token = client.post("/auth/token", json={"username": "admin", "password": password})
        token.raise_for_status()
        client.headers["Authorization"] = f"Bearer {token.json()['access_token']}"
        _wait("the DAG processor to register the DAG",
              lambda: client.get(f"/api/v2/dags/{DAG_ID}").status_code == 200, timeout=120)
        yield Airflow(url, client, home, root / "artifacts", root / "reports", smtp[1])
    except BaseException:
        for name in COMPONENTS:
            print(f"--- {name} log (tail) ---\n{_tail(logs[name])}")
        raise
    finally:
        client.close()
        for proc in procs.values():
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGTERM)
        for proc in procs.values():
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(timeout=10)


@pytest.mark.timeout(300)  # includes starting the components
def test_dag_starts_paused_and_unpauses_through_the_api(airflow):
    assert airflow.client.get(f"/api/v2/dags/{DAG_ID}").json()["is_paused"] is True
    dag = airflow.client.patch(f"/api/v2/dags/{DAG_ID}", json={"is_paused": False})
    assert dag.status_code == 200, dag.text
    assert dag.json()["is_paused"] is False
    # Scheduled on the data asset: no time-based run, and nothing starts until an event
    # (the next test finds no run).
    assert dag.json()["next_dagrun_run_after"] is None
    details = airflow.client.get(f"/api/v2/dags/{DAG_ID}/details").raise_for_status().json()
    assert "loraflow_imdb_data" in json.dumps(details["asset_expression"])


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
    # where each variant ran, recorded by the variant itself (a worker process here)
    import torch
    import transformers

    for r in records.values():
        p = r["provenance"]
        assert (p["torch"], p["transformers"]) == (torch.__version__, transformers.__version__)
        assert p["cuda"] and p["device_name"] and p["host"] and p["git_commit"] != "unknown"
    assert {records[n]["provenance"]["precision"] for n in gpu_names} <= {"fp32", "bf16"}
    assert (airflow.reports / report_slug(run_id) / "report.html").exists()


def _finished(airflow: Airflow, dag_id: str, run_id: str) -> str | None:
    run = airflow.client.get(f"/api/v2/dags/{dag_id}/dagRuns/{quote(run_id, safe='')}")
    state = run.raise_for_status().json()["state"]
    return state if state in ("success", "failed") else None


def _asset_id(airflow: Airflow, name: str) -> int:
    found = airflow.client.get("/api/v2/assets", params={"name_pattern": name}).raise_for_status()
    [asset] = [a for a in found.json()["assets"] if a["name"] == name]
    return asset["id"]


def _mail(airflow: Airflow, run_id: str, timeout: float = 120) -> list[EmailMessage]:
    """The messages about `run_id`, once there is one, plus a moment for a second (none
    may come: exactly one is expected); the DAG processor runs the callbacks."""
    messages = _wait(f"a message about {run_id}", lambda: airflow.smtp.about(run_id), timeout)
    time.sleep(5)
    return airflow.smtp.about(run_id) or messages


def _screenshots(airflow: Airflow, run_id: str, folder: Path) -> None:
    """The UI's asset event views of this run, logged in with the test's token."""
    from playwright.sync_api import sync_playwright

    token = airflow.client.headers["Authorization"].split()[1]
    run = quote(run_id, safe="")
    pages = {"dag_overview": f"/dags/{DAG_ID}", "run_asset_events":
             f"/dags/{DAG_ID}/runs/{run}/asset_events", "assets": "/assets",
             "example_dag": f"/dags/{EXAMPLE_DAG_ID}"}
    folder.mkdir(parents=True, exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium")
        try:
            context = browser.new_context(viewport={"width": 1400, "height": 1000})
            context.add_cookies([{"name": "_token", "value": token, "url": airflow.url}])
            page = context.new_page()
            for name, path in pages.items():
                page.goto(airflow.url + path)
                page.wait_for_timeout(8000)
                page.screenshot(path=str(folder / f"ui_{name}.png"), full_page=True)
        finally:
            browser.close()


def _body(message: EmailMessage) -> str:
    return message.get_body(("html", "plain")).get_content()


def _fail_a_run(airflow: Airflow) -> str:
    """A run that fails in `prepare`: its data folder does not exist."""
    created = airflow.trigger({"preset": "smoke", "data": "/no/such/imdb/folder"})
    assert created.status_code == 200, created.text
    run_id = created.json()["dag_run_id"]
    state = _wait("the failing run", lambda: _finished(airflow, DAG_ID, run_id), 180, 2)
    assert state == "failed"
    return run_id


@pytest.mark.timeout(300)
def test_without_the_connection_a_failed_run_sends_nothing(airflow):
    run_id = _fail_a_run(airflow)

    # the DAG processor ran the failure callback, which found no connection
    def callback_ran():
        return any(f"no notification sent for run {run_id}: connection" in text
                   for text in (p.read_text(errors="replace")
                                for p in (airflow.home / "logs").rglob("*.log")))

    _wait("the DAG processor to run the failure callback", callback_ran, timeout=120, every=2)
    assert airflow.smtp.messages == []


@pytest.mark.timeout(600)
def test_an_event_on_the_data_asset_starts_a_run_whose_report_events_start_the_example(
        airflow, imdb_dir, smtp):
    from tasks import assets

    # From now on every run notifies through the SMTP server.
    extra = {"from_email": "loraflow@example.com", "to": "ml-team@example.com",
             "disable_ssl": True, "disable_tls": True}
    created = airflow.client.post("/api/v2/connections", json={
        "connection_id": NOTIFY_CONN_ID, "conn_type": "smtp", "host": "127.0.0.1",
        "port": smtp[0], "extra": json.dumps(extra)})
    assert created.status_code == 201, created.text
    for dag_id in (DAG_ID, EXAMPLE_DAG_ID):
        airflow.client.patch(f"/api/v2/dags/{dag_id}", json={"is_paused": False}).raise_for_status()
    before = {r["dag_run_id"] for r in airflow.runs()}
    params = {"preset": "smoke", "data": str(imdb_dir), "train_size": 64, "val_size": 32,
              "test_size": 32, "max_length": 32, "ranks": [2], "methods": ["majority", "lora"]}
    event = airflow.client.post("/api/v2/assets/events", json={
        "asset_id": _asset_id(airflow, assets.DATA["name"]), "extra": {"params": params}})
    assert event.status_code == 200, event.text

    def new_run():
        runs = [r for r in airflow.runs() if r["dag_run_id"] not in before]
        return runs[0] if runs else None

    run = _wait("the asset event to start a run", new_run, timeout=60)
    run_id = run["dag_run_id"]
    assert run["run_type"] == "asset_triggered"
    state = _wait("the asset-triggered run", lambda: _finished(airflow, DAG_ID, run_id), 420, 2)
    assert state == "success"
    config = json.loads((airflow.artifacts / "runs" / run_id / "config.json").read_text())
    assert (config["preset"], config["train_size"], config["methods"]) == (
        "smoke", 64, ["majority", "lora"])  # the event's params, not the form's defaults

    # report's outlet events carry the extras
    url = f"{airflow.url}/loraflow/reports/{report_slug(run_id)}/report.html"
    by_asset = {}
    for name in (assets.REPORT["name"], assets.ADAPTER["name"]):
        got = airflow.client.get("/api/v2/assets/events", params={
            "asset_id": _asset_id(airflow, name), "source_run_id": run_id}).raise_for_status()
        [by_asset[name]] = got.json()["asset_events"]
    report, adapter = by_asset[assets.REPORT["name"]], by_asset[assets.ADAPTER["name"]]
    assert (report["source_dag_id"], report["source_task_id"]) == (DAG_ID, "report")
    extra = report["extra"]
    assert (extra["run_id"], extra["preset"], extra["report_url"]) == (run_id, "smoke", url)
    summary = json.loads((airflow.reports / report_slug(run_id) / "summary.json").read_text())
    assert set(extra["selected"]) == {"majority", "lora"}
    for method, chosen in extra["selected"].items():
        stored = summary["selected"][method]
        assert chosen["configuration"] == stored["configuration"]
        assert (chosen["validation_accuracy"], chosen["accuracy"]) == (
            stored["validation_accuracy"], stored["accuracy"])
        assert 0 <= chosen["accuracy"] <= 1 and 0 <= chosen["validation_accuracy"] <= 1
    adapter_path = Path(adapter["extra"]["adapter_path"])
    assert adapter_path == airflow.artifacts / "runs" / run_id / "results" / (
        f"{extra['selected']['lora']['configuration']}_s42") / "adapter"
    assert (adapter_path / "adapter_config.json").exists()

    # the example DAG, scheduled on the report asset, ran on this event
    def example_run():
        for r in airflow.client.get(f"/api/v2/dags/{EXAMPLE_DAG_ID}/dagRuns").json()["dag_runs"]:
            events = airflow.client.get(
                f"/api/v2/dags/{EXAMPLE_DAG_ID}/dagRuns/{quote(r['dag_run_id'], safe='')}"
                "/upstreamAssetEvents").json()["asset_events"]
            if any(e["source_run_id"] == run_id for e in events) and r["state"] == "success":
                return r
        return None

    _wait("the example DAG to run after the report", example_run, timeout=120, every=2)
    if shots := os.environ.get("LORAFLOW_SCREENSHOTS"):  # for people, not an assertion
        _screenshots(airflow, run_id, Path(shots))

    # one message about the successful run, with the headline and the report's URL
    [message] = _mail(airflow, run_id)
    assert message["Subject"] == f"[loraflow] run {run_id} succeeded"
    assert message["To"] == "ml-team@example.com"
    body = _body(message)
    assert url in body and summary["headline"][:60] in body


@pytest.mark.timeout(300)
def test_with_the_connection_a_failed_run_sends_one_message(airflow):
    run_id = _fail_a_run(airflow)
    [message] = _mail(airflow, run_id)
    assert message["Subject"] == f"[loraflow] run {run_id} failed"
    body = _body(message)
    assert "Reason:" in body and "No report was written" in body
