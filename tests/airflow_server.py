"""A real Airflow for the tests: API server, scheduler and DAG processor as separate
processes (LocalExecutor, SQLite in a throw-away home), driven only through the REST API
v2. One per session (tests/conftest.py), shared by the scheduler, browser and plugin tests."""

from __future__ import annotations

import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import httpx
from cryptography.fernet import Fernet

from tests.dags.conftest import DAG_ID

COMPONENTS = ("api-server", "scheduler", "dag-processor")
NOTIFY_CONN = "loraflow_notify"  # $LORAFLOW_NOTIFY_CONN_ID of the session's Airflow


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


def _tail(path: Path, lines: int = 40) -> str:
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:]) if path.exists() else ""


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

    def asset_id(self, name: str) -> int:
        found = self.client.get("/api/v2/assets", params={"name_pattern": name})
        [asset] = [a for a in found.raise_for_status().json()["assets"] if a["name"] == name]
        return asset["id"]

    def post_asset_event(self, name: str, extra: dict) -> dict:
        """An event on the asset `name`, as an upstream system would post it."""
        body = {"asset_id": self.asset_id(name), "extra": extra}
        return self.client.post("/api/v2/assets/events", json=body).raise_for_status().json()

    def asset_events(self, name: str, **params) -> list[dict]:
        found = self.client.get("/api/v2/assets/events",
                                params={"asset_id": self.asset_id(name), **params})
        return found.raise_for_status().json()["asset_events"]

    def callback_log(self) -> str:
        """What the DAG processor said about the DAG-level callbacks (where notifications are
        sent) and about processors it killed: for the message of a test that waited in vain."""
        lines = []
        for log in sorted((self.home / "logs" / "dag_processor").rglob("*.log")):
            lines += [line for line in log.read_text(errors="replace").splitlines()
                      if any(w in line for w in ("callback", "notification", "error", "Error"))]
        manager = self.home.parent / "dag-processor.log"
        if manager.exists():
            lines += [line for line in manager.read_text(errors="replace").splitlines()
                      if "Killing it" in line or "callback" in line.lower()]
        return "\n".join(lines[-40:])

    def delete_runs(self) -> None:
        """Forget every DAG run, so that a test starts from an Airflow that ran nothing."""
        for run in self.runs():
            self.client.delete(f"/api/v2/dags/{DAG_ID}/dagRuns/"
                               f"{quote(run['dag_run_id'], safe='')}").raise_for_status()


@contextmanager
def running_airflow(root: Path, env: dict[str, str], migrated_db: Path) -> Iterator[Airflow]:
    """Start the three components in `root` (the metadata database copied from
    `migrated_db`, which holds the `gpu` pool of one slot); stop them (whole process groups,
    so LocalExecutor workers and running tasks go too) when the block ends."""
    home, port = root / "home", _free_port()
    home.mkdir()
    shutil.copyfile(migrated_db, home / "airflow.db")  # saves an `airflow db migrate`
    url = f"http://127.0.0.1:{port}"
    password = secrets.token_urlsafe(16)
    # The simple auth manager keeps its users' passwords in this file; writing it first
    # gives `admin` a password the test knows.
    (home / "simple_auth_manager_passwords.json.generated").write_text(json.dumps({"admin": password}))
    env = {
        **env,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": f"sqlite:///{home}/airflow.db",
        "AIRFLOW__CORE__EXECUTOR": "tasks.preload.LocalExecutor",  # as make ui
        "AIRFLOW__CORE__PARALLELISM": "3",  # room for 3 tasks at once: the pool must hold them back
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": "admin:admin",
        "AIRFLOW__API_AUTH__JWT_SECRET": secrets.token_urlsafe(32),  # shared by every component
        # Shared too: without it, each component that starts before airflow.cfg exists
        # generates a key of its own, and the DAG processor cannot decrypt a connection
        # the API server stored (the callbacks then find no connection to notify through).
        "AIRFLOW__CORE__FERNET_KEY": Fernet.generate_key().decode(),
        "AIRFLOW__API__HOST": "127.0.0.1",
        "AIRFLOW__API__PORT": str(port),
        "AIRFLOW__API__BASE_URL": url,
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
        "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(_free_port()),  # not 8793: may be taken
        "AIRFLOW__SCHEDULER__SCHEDULER_HEARTBEAT_SEC": "2",
        # The DAG processor runs the run callbacks that send notifications; on a loaded
        # 2-core machine its default 50 s limit per file could kill one with its callbacks.
        "AIRFLOW__DAG_PROCESSOR__DAG_FILE_PROCESSOR_TIMEOUT": "300",
        # The DAG files do not change during the tests: parse them at start, not every 30 s
        # (callbacks are still run at once); two cores are shared with the other tests.
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "600",
        "LORAFLOW_ARTIFACTS": str(root / "artifacts"),
        "LORAFLOW_REPORTS": str(root / "reports"),
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "OMP_NUM_THREADS": "1",  # 3 task processes on a 2-core machine: no thread oversubscription
    }
    env.pop("LORAFLOW_DEVICE", None)
    # A run starts only when the data asset receives an event (or a test triggers one);
    # notifications go through NOTIFY_CONN, once a test creates that connection.
    env.update({"LORAFLOW_SCHEDULE": "asset", "LORAFLOW_NOTIFY_CONN_ID": NOTIFY_CONN})

    procs: dict[str, subprocess.Popen] = {}
    logs = {name: root / f"{name}.log" for name in COMPONENTS}
    client = httpx.Client(base_url=url, timeout=30)
    try:
        for name in COMPONENTS:
            with open(logs[name], "wb") as log:
                procs[name] = subprocess.Popen([sys.executable, "-m", "airflow", name], env=env,
                                               stdout=log, stderr=subprocess.STDOUT,
                                               start_new_session=True)

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
