"""The REST API of a running cluster, as its admin: trigger a run, wait for it, read its
task instances, tries and logs, and a table of which worker ran what. `loraflow_cluster.py
trigger` and the cluster tests (tests/cluster/) share it."""

from __future__ import annotations

from urllib.parse import quote

from cluster_env import ADMIN
from cluster_processes import wait_for

from tasks.steps import DAG_ID


class Api:
    """The cluster's REST API as the admin (token from POST /auth/token)."""

    def __init__(self, url: str, password: str):
        import httpx

        self.client = httpx.Client(base_url=url, timeout=30)
        token = self.client.post("/auth/token", json={"username": ADMIN, "password": password})
        token.raise_for_status()
        self.client.headers["Authorization"] = f"Bearer {token.json()['access_token']}"

    def get(self, path: str, **params):
        return self.client.get(path, params=params).raise_for_status().json()

    def run_path(self, run_id: str) -> str:
        return f"/api/v2/dags/{DAG_ID}/dagRuns/{quote(run_id, safe='')}"

    def trigger(self, conf: dict) -> str:
        """Unpause the DAG, start a run with `conf`; return its run id."""
        self.client.patch(f"/api/v2/dags/{DAG_ID}", json={"is_paused": False}).raise_for_status()
        created = self.client.post(
            f"/api/v2/dags/{DAG_ID}/dagRuns", json={"logical_date": None, "conf": conf}
        )
        if created.status_code != 200:
            raise RuntimeError(f"trigger refused ({created.status_code}): {created.text}")
        return created.json()["dag_run_id"]

    def run(self, run_id: str) -> dict:
        return self.get(self.run_path(run_id))

    def wait(self, run_id: str, timeout: float) -> dict:
        def finished():
            run = self.run(run_id)
            return run if run["state"] in ("success", "failed") else None

        return wait_for(f"run {run_id}", finished, timeout, every=2)

    def task_instances(self, run_id: str) -> list[dict]:
        return self.get(f"{self.run_path(run_id)}/taskInstances", limit=1000)["task_instances"]

    def tries(self, run_id: str, ti: dict) -> list[dict]:
        path = f"{self.run_path(run_id)}/taskInstances/{ti['task_id']}/{ti['map_index']}/tries"
        if ti["map_index"] < 0:
            path = f"{self.run_path(run_id)}/taskInstances/{ti['task_id']}/tries"
        return self.get(path)["task_instances"]

    def log(self, run_id: str, ti: dict, try_number: int) -> list[str]:
        """The messages of one try's log (the `event` of each structured line)."""
        path = f"{self.run_path(run_id)}/taskInstances/{ti['task_id']}/logs/{try_number}"
        content = self.get(path, map_index=ti["map_index"], full_content=True)["content"]
        return [line.get("event", "") if isinstance(line, dict) else str(line) for line in content]


def run_table(api: Api, run_id: str) -> str:
    """Tasks of a run in start order: worker (task instance hostname), queue, queued, start,
    end. `wait` = queued -> start: Airflow's own overhead per task (scheduler, broker,
    worker, task process start), before any of our code runs."""
    from datetime import datetime

    run = api.run(run_id)
    t0 = datetime.fromisoformat(run["start_date"])

    def offset(stamp: str | None) -> str:
        return f"{(datetime.fromisoformat(stamp) - t0).total_seconds():6.1f}" if stamp else "     -"

    rows = sorted(api.task_instances(run_id), key=lambda t: t["start_date"] or "~")
    lines = [
        f"run {run_id}: {run['state']}, {len(rows)} task instances, times in s from the run's start",
        f"{'task':<34} {'queue':<8} {'worker':<28} {'queued':>6} {'start':>6} {'end':>6} "
        f"{'wait':>5} {'try':>3}",
    ]
    for t in rows:
        name = t["task_id"] + (
            f"[{t['rendered_map_index'] or t['map_index']}]" if t["map_index"] >= 0 else ""
        )
        wait = (
            f"{(datetime.fromisoformat(t['start_date']) - datetime.fromisoformat(t['queued_when'])).total_seconds():5.1f}"
            if t.get("queued_when") and t["start_date"]
            else "    -"
        )
        lines.append(
            f"{name[:34]:<34} {t['queue'] or '-':<8} {(t['hostname'] or '-')[:28]:<28} "
            f"{offset(t.get('queued_when'))} {offset(t['start_date'])} "
            f"{offset(t['end_date'])} {wait} {t['try_number']:>3}"
        )
    if run["end_date"]:
        wall = (datetime.fromisoformat(run["end_date"]) - t0).total_seconds()
        lines.append(f"wall time (run start to end): {wall:.1f} s")
    return "\n".join(lines)
