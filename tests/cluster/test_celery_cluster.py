"""`make cluster` for real: Airflow's CeleryExecutor on PostgreSQL and Redis, an api-server,
scheduler, dag-processor, triggerer, one default and two `gpu` Celery workers as separate
processes (scripts/loraflow_cluster.py), driven only through the REST API.

Task ids are not named here (the DAG's mapping is being reworked): task instances are
told apart by their `queue`, workers by the `hostname` each task instance records, and
training variants by their run folder (`results/<variant>/checkpoints/epoch-NNN/` while
training, `metrics.json` when done). The tests share one cluster and run in file order."""

from __future__ import annotations

import importlib.util
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from datetime import datetime
from itertools import combinations
from pathlib import Path

import cluster_api  # scripts/ (tests/cluster/__init__.py): the REST client the launcher shares
import cluster_env
import cluster_processes
import pytest

from tasks.paths import report_slug
from tasks.steps import DAG_ID

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "loraflow_cluster.py"
GPU_WORKERS = 2
TEST_REDIS_DB = 11  # the cluster tests' own Redis database; keys also carry a per-run prefix

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


# Two ranks, two seeds, full fine-tuning and the baselines, on a tiny slice of IMDB.
SMOKE_SWEEP = {"preset": "smoke", "ranks": [2, 4], "seeds": [1, 2],
               "train_size": 64, "test_size": 32, "max_length": 32}
# Long enough to kill a worker between a variant's first epoch checkpoint and its end.
FAULT_RUN = {"preset": "smoke", "ranks": [4], "seeds": [1], "epochs": 3,
             "train_size": 2000, "test_size": 64, "max_length": 64}


def _reachable(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(2)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _require(ok: bool, why: str) -> None:
    """Skip on a laptop without the services; fail in CI, where they must be there."""
    if not ok:
        if os.environ.get("CI"):
            pytest.fail(why)
        pytest.skip(why)


def _free_port_block(size: int) -> int:
    for _ in range(100):
        base = 20000 + secrets.randbelow(30000)
        if not any(_reachable(base + i) for i in range(size)):
            return base
    raise RuntimeError("no block of free ports found")


def _environment(session: int, home: Path) -> dict | None:
    """The environment a component started with, read from the first process of its session
    whose /proc/<pid>/environ setproctitle left readable."""
    for proc in sorted(cluster_processes.processes_in_sessions({session}), key=lambda p: p.pid):
        env = proc.environ()
        if env.get("AIRFLOW_HOME") == str(home):
            return env
    return None


def _at(stamp: str) -> datetime:
    return datetime.fromisoformat(stamp)


def _overlap(a: dict, b: dict) -> bool:
    return _at(a["start_date"]) < _at(b["end_date"]) and _at(b["start_date"]) < _at(a["end_date"])


@dataclass
class Cluster:
    home: Path
    state: dict
    api: cluster_api.Api

    @property
    def workers(self) -> dict[str, dict]:
        return {name: c for name, c in self.state["components"].items() if c["queue"]}

    def hostnames(self, queue: str) -> set[str]:
        return {c["hostname"] for c in self.workers.values() if c["queue"] == queue}

    def run_dir(self, run_id: str) -> Path:
        return Path(self.state["artifacts"]) / "runs" / run_id

    def metrics(self, run_id: str) -> dict[str, dict]:
        return {p.parent.name: json.loads(p.read_text())
                for p in self.run_dir(run_id).glob("results/*/metrics.json")}

    def report(self, run_id: str) -> Path:
        return Path(self.state["reports"]) / report_slug(run_id) / "report.html"


@pytest.fixture(scope="module")
def cluster(tmp_path_factory, imdb_dir):
    _require(_reachable(5432), "PostgreSQL is not running on 127.0.0.1:5432")
    _require(_reachable(6379), "Redis is not running on 127.0.0.1:6379")
    for module in ("airflow.providers.celery", "psycopg2", "redis"):
        _require(importlib.util.find_spec(module) is not None,
                 f"{module} is not installed (make setup installs the `celery` extra)")

    home = tmp_path_factory.mktemp("celery-cluster")
    database = f"loraflow_test_{secrets.token_hex(4)}"
    redis_url = f"redis://127.0.0.1:6379/{TEST_REDIS_DB}"
    env = {
        **os.environ,
        "LORAFLOW_DATA": str(imdb_dir),
        "LORAFLOW_SCHEDULE": "none",  # only the runs the tests trigger
        "LORAFLOW_RETRY_DELAY_S": "2",
        # A killed worker stops heartbeating; notice it in seconds, not the default 5 min.
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "3",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "LORAFLOW_PROGRESS": "0",
    }
    start = [sys.executable, str(SCRIPT), "--home", str(home), "start",
             "--gpu-workers", str(GPU_WORKERS), "--default-concurrency", "2",
             "--port", str(_free_port_block(3 + GPU_WORKERS)), "--database", database,
             "--redis", redis_url, "--redis-prefix", f"{database}:",
             "--artifacts", str(home / "artifacts"), "--reports", str(home / "reports"),
             "--timeout", "240"]
    stop = [sys.executable, str(SCRIPT), "--home", str(home), "stop", "--grace", "10"]
    try:
        started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=600,
                                 check=False)
        assert started.returncode == 0, f"start failed:\n{started.stdout}\n{started.stderr}"
        state = cluster_processes.load_state(home)
        yield Cluster(home, state, cluster_api.Api(state["url"], cluster_env.secrets_of(home)["admin_password"]))
    except BaseException:
        for log in sorted((home / "logs").glob("*.out")):
            print(f"--- {log.name} (tail) ---\n{cluster_processes.tail(log)}")
        raise
    finally:
        subprocess.run(stop, env=env, capture_output=True, timeout=120, check=False)
        try:
            _drop_database(database)
        finally:
            _drop_redis_keys(redis_url, f"{database}:")


def _drop_database(name: str) -> None:
    import psycopg2

    conn = psycopg2.connect("postgresql://postgres@127.0.0.1:5432/postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        conn.close()


def _drop_redis_keys(url: str, prefix: str) -> None:
    import redis

    client = redis.Redis.from_url(url)
    for key in client.scan_iter(match=f"{prefix}*"):
        client.delete(key)
    client.close()


@pytest.mark.timeout(600)  # includes starting the cluster
def test_components_share_the_deployment_settings(cluster):
    shared = cluster_env.read_env_file(cluster_env.SHARED_SETTINGS)
    envs = {name: _environment(entry["pid"], cluster.home)
            for name, entry in cluster.state["components"].items()}
    # setproctitle overwrites /proc/<pid>/environ of the api-server (and of nothing it starts);
    # the runs below show it shares the JWT secret: every task authenticates against it.
    assert envs.pop("api-server") is None
    assert all(envs.values()), [name for name, env in envs.items() if env is None]
    for name, env in envs.items():
        assert {k: env.get(k) for k in shared} == shared, name  # docker/airflow.env, unchanged
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == cluster.state["url"] + "/execution/"
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].startswith("postgresql+psycopg2://")
        assert env["AIRFLOW__DATABASE__SQL_ALCHEMY_CONN"].endswith("/" + cluster.state["database"])
        assert env["AIRFLOW__CELERY__BROKER_URL"] == cluster.state["redis"]
    for key in ("AIRFLOW__API_AUTH__JWT_SECRET", "AIRFLOW__API__SECRET_KEY",
                "AIRFLOW__CORE__FERNET_KEY_CMD"):
        assert len({env[key] for env in envs.values()}) == 1, f"{key} differs between components"

    gpu = [envs[name] for name, c in cluster.workers.items() if c["queue"] == "gpu"]
    assert len(gpu) == GPU_WORKERS
    log_ports = [env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"]
                 for name, env in envs.items() if name in cluster.workers]
    assert len(set(log_ports)) == len(log_ports)
    if cluster.state["gpus"]:
        assert len({env["CUDA_VISIBLE_DEVICES"] for env in gpu}) == GPU_WORKERS
    assert cluster.api.get("/api/v2/pools/gpu")["slots"] == GPU_WORKERS
    assert cluster.api.get(f"/api/v2/dags/{DAG_ID}")["is_paused"] is True  # as in docker/


@pytest.mark.timeout(420)
def test_smoke_sweep_runs_encoder_tasks_on_gpu_workers_two_at_a_time(cluster):
    run_id = cluster.api.trigger(SMOKE_SWEEP)
    run = cluster.api.wait(run_id, timeout=400)
    print(cluster_api.run_table(cluster.api, run_id))
    tis = cluster.api.task_instances(run_id)
    assert run["state"] == "success", {(t["task_id"], t["map_index"]): t["state"] for t in tis}

    ran = [t for t in tis if t["state"] == "success"]
    gpu = [t for t in ran if t["queue"] == "gpu"]
    default = [t for t in ran if t["queue"] != "gpu"]
    assert len(gpu) >= 6 and default  # 2 ranks x 2 seeds of LoRA, 2 of full fine-tuning, ...
    # Each task instance ran on a worker of its queue.
    assert {t["hostname"] for t in gpu} <= cluster.hostnames("gpu")
    assert {t["hostname"] for t in default} == cluster.hostnames("default")
    assert all(t["pool"] == "gpu" for t in gpu)

    # Both gpu workers worked; two training tasks ran at once, never two on one worker.
    assert {t["hostname"] for t in gpu} == cluster.hostnames("gpu")
    pairs = list(combinations(gpu, 2))
    assert any(_overlap(a, b) for a, b in pairs if a["hostname"] != b["hostname"])
    same_worker = [(a["task_id"], b["task_id"]) for a, b in pairs
                   if a["hostname"] == b["hostname"] and _overlap(a, b)]
    assert same_worker == []

    metrics = cluster.metrics(run_id)
    trained = {v for v, m in metrics.items() if m["method"] in ("lora", "full_finetune")}
    assert len(trained) == 6  # lora r2/r4 x seeds 1/2, full fine-tuning x seeds 1/2
    # zero-shot has nothing to say on random weights: not_applicable, with its reason
    assert all(m["status"] == ("not_applicable" if m["method"] == "zero_shot" else "ok")
               for m in metrics.values()), metrics
    assert cluster.report(run_id).exists()


def _kill_worker(pid: int) -> list:
    """SIGKILL a worker the way a lost machine dies: every process of its session (Celery's
    main and pool processes, its log server, the task process in its own process group)."""
    procs = cluster_processes.processes_in_sessions({pid})
    for proc in procs:
        proc.kill()
    return procs


@pytest.mark.timeout(600)
def test_a_killed_gpu_worker_loses_nothing(cluster):
    import psutil

    run_id = cluster.api.trigger(FAULT_RUN)
    results = cluster.run_dir(run_id) / "results"

    def gpu_tasks_past_their_first_epoch():
        """The running gpu task instances, once each of them trains a variant that has
        finished an epoch: killing any of them then interrupts a resumable training."""
        gpu = [t for t in cluster.api.task_instances(run_id) if t["queue"] == "gpu"]
        assert not [t for t in gpu if t["state"] in ("failed", "upstream_failed")], gpu
        running = [t for t in gpu if t["state"] == "running" and t["hostname"]]
        training = {d.name for d in results.glob("*") if any(d.glob("checkpoints/epoch-*"))
                    and not (d / "metrics.json").exists()}
        return running if running and len(training) == len(running) else None

    running = cluster_processes.wait_for("gpu tasks past their first epoch", gpu_tasks_past_their_first_epoch,
                          timeout=400, every=0.5)
    # The one that started last has the most training left.
    victim = max(running, key=lambda t: t["start_date"])["hostname"]
    name = next(n for n, c in cluster.workers.items() if c["hostname"] == victim)
    pid = cluster.state["components"][name]["pid"]
    killed_at = time.time()
    gone = _kill_worker(pid)
    _, alive = psutil.wait_procs(gone, timeout=10)
    assert alive == [] and cluster_processes.processes_in_sessions({pid}) == []

    run = cluster.api.wait(run_id, timeout=480)
    print(f"killed {name} (pid {pid}, {len(gone)} processes) at {killed_at:.0f}")
    print(cluster_api.run_table(cluster.api, run_id))
    tis = cluster.api.task_instances(run_id)
    assert run["state"] == "success", {(t["task_id"], t["map_index"]): t["state"] for t in tis}

    # Airflow noticed: the killed try failed (it stopped heartbeating), and a retry on the
    # surviving worker resumed from the variant's epoch checkpoint.
    tries = {(t["task_id"], t["map_index"]): cluster.api.tries(run_id, t)
             for t in tis if t["queue"] == "gpu"}
    on_victim = [x for history in tries.values() for x in history if x["hostname"] == victim]
    killed = [x for x in on_victim if x["state"] != "success"]
    assert [x["state"] for x in killed] == ["failed"], on_victim
    assert all(_at(x["end_date"]).timestamp() < killed_at for x in on_victim if x not in killed)
    history = tries[(killed[0]["task_id"], killed[0]["map_index"])]
    retry = max(history, key=lambda x: x["try_number"])
    assert retry["state"] == "success" and retry["try_number"] > killed[0]["try_number"], history
    assert retry["hostname"] in cluster.hostnames("gpu") - {victim}
    log = cluster.api.log(run_id, retry, retry["try_number"])
    assert any("resuming after epoch" in line for line in log), "\n".join(log)
    # Nothing started on the dead worker after it died.
    assert all(_at(t["start_date"]).timestamp() < killed_at
               for t in tis if t["hostname"] == victim)

    metrics = cluster.metrics(run_id)
    assert {m["method"] for m in metrics.values()} >= {"lora", "full_finetune"}
    # zero-shot has nothing to say on random weights: not_applicable, with its reason
    assert all(m["status"] == ("not_applicable" if m["method"] == "zero_shot" else "ok")
               for m in metrics.values()), metrics
    assert not list(results.glob("*/checkpoints"))  # removed once each variant finished
    assert cluster.report(run_id).exists()


@pytest.mark.timeout(180)
def test_stop_ends_every_process_it_started(cluster):
    import psutil

    sessions = cluster_processes.sessions_of(cluster.state)
    before = cluster_processes.processes_in_sessions(sessions)
    assert len(before) > 2 * len(sessions)  # pool processes, log servers, ...
    stop = [sys.executable, str(SCRIPT), "--home", str(cluster.home), "stop", "--grace", "10"]
    stopped = subprocess.run(stop, capture_output=True, text=True, timeout=120, check=False)
    assert stopped.returncode == 0, stopped.stderr
    _, alive = psutil.wait_procs(before, timeout=5)
    assert alive == [] and cluster_processes.processes_in_sessions(sessions) == []
    assert cluster_processes.load_state(cluster.home)["components"] == {}
