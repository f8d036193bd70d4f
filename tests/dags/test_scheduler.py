"""A real Airflow: API server, scheduler and DAG processor as separate processes
(LocalExecutor, SQLite in a throw-away home), driven only through the REST API v2, as a
user's script or the web UI would. The `gpu` pool has one slot, so the encoder variants
(two LoRA ranks and full fine-tuning) of a smoke sweep must run one after another."""

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
from datetime import UTC, datetime
from itertools import pairwise
from pathlib import Path
from urllib.parse import quote

import httpx
import pytest

from tasks.paths import report_slug
from tasks.pipeline import config_from_params
from tests.dags.conftest import DAG_ID, airflow_env

pytestmark = [pytest.mark.slow, pytest.mark.scheduler]

COMPONENTS = ("api-server", "scheduler", "dag-processor")


def _free_port() -> int:
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

    def trigger(self, conf: dict) -> httpx.Response:
        return self.client.post(f"/api/v2/dags/{DAG_ID}/dagRuns",
                                json={"logical_date": None, "conf": conf})

    def runs(self) -> list[dict]:
        return self.client.get(f"/api/v2/dags/{DAG_ID}/dagRuns").raise_for_status().json()["dag_runs"]


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


@pytest.fixture(scope="module")
def airflow(tmp_path_factory):
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
        AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT=str(_free_port()),  # not 8793: may be taken
        AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC="2",
        LORAFLOW_ARTIFACTS=str(root / "artifacts"),
        LORAFLOW_REPORTS=str(root / "reports"),
        HF_HUB_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
        OMP_NUM_THREADS="1",  # 3 task processes on a 2-core machine: no thread oversubscription
    )
    env.pop("LORAFLOW_DEVICE", None)
    env.pop("LORAFLOW_SCHEDULE", None)  # the default, weekly: unpausing must not start a run
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

        _wait("the API server", api_up, timeout=120)
        token = client.post("/auth/token", json={"username": "admin", "password": password})
        token.raise_for_status()
        client.headers["Authorization"] = f"Bearer {token.json()['access_token']}"
        _wait("the DAG processor to register the DAG",
              lambda: client.get(f"/api/v2/dags/{DAG_ID}").status_code == 200, timeout=120)
        yield Airflow(url, client, home, root / "artifacts", root / "reports")
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
              "validate_dataset", "tokenize", "report"}
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
