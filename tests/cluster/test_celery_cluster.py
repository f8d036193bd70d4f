"""`make cluster` for real: Airflow's CeleryExecutor on a PostgreSQL and a Redis of the tests'
own (tests/cluster/servers.py), an api-server, scheduler, dag-processor, triggerer, one
default and two `gpu` Celery workers as separate processes (scripts/loraflow_cluster.py),
driven only through the REST API.

Task ids are not named here (the DAG's mapping is being reworked): task instances are
told apart by their `queue`, workers by the `hostname` each task instance records, and
training variants by their run folder (`results/<variant>/checkpoints/epoch-NNN/` while
training, `metrics.json` when done) and their map index (the variant's name). The tests
share one cluster and run in file order: the settings, three runs at once, faults injected
while a variant trains (a worker, the scheduler, the broker, the database, the API server,
the disk), and `stop`. The artifacts root is a tmpfs of its own where root may mount one."""

from __future__ import annotations

import errno
import fcntl
import importlib.util
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime
from itertools import combinations
from pathlib import Path

import cluster_api  # scripts/ (tests/cluster/__init__.py): the REST client the launcher shares
import cluster_env
import cluster_processes
import pytest

from tasks import registry
from tasks.paths import report_slug
from tasks.steps import DAG_ID
from tests.cluster import servers

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "scripts" / "loraflow_cluster.py"
GPU_WORKERS = 2

pytestmark = [pytest.mark.slow, pytest.mark.cluster]


# Two ranks, two seeds, full fine-tuning and the baselines, on a tiny slice of IMDB.
SMOKE_SWEEP = {"preset": "smoke", "ranks": [2, 4], "seeds": [1, 2],
               "train_size": 64, "test_size": 32, "max_length": 32}
# Two small runs triggered with the sweep: some variant names are the sweep's too.
BESIDE_THE_SWEEP = (
    {"preset": "smoke", "methods": ["majority", "lora"], "ranks": [2], "seeds": [1],
     "train_size": 64, "test_size": 32, "max_length": 32},
    {"preset": "smoke", "methods": ["majority", "lora"], "ranks": [2, 4], "seeds": [2],
     "train_size": 64, "test_size": 32, "max_length": 32},
)
# Long enough to kill a worker between a variant's first epoch checkpoint and its end, and
# to have a variant training at each control-plane fault after that.
FAULT_RUN = {"preset": "smoke", "methods": ["majority", "lora", "full_finetune"], "ranks": [4],
             "seeds": [1], "epochs": 15,
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
    env: dict  # the environment `start` ran with; `restart` needs the same
    postgres: servers.Postgres
    redis: servers.Redis
    small_disk: bool  # the artifacts root is a tmpfs of SMALL_DISK_MB

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
    _require(servers.missing() is None, f"no PostgreSQL and Redis of the tests' own: {servers.missing()}")
    for module in ("airflow.providers.celery", "psycopg2", "redis"):
        _require(importlib.util.find_spec(module) is not None,
                 f"{module} is not installed (make setup installs the `celery` extra)")

    home = tmp_path_factory.mktemp("celery-cluster")
    env = {
        **os.environ,
        "LORAFLOW_DATA": str(imdb_dir),
        "LORAFLOW_SCHEDULE": "none",  # only the runs the tests trigger
        "LORAFLOW_RETRY_DELAY_S": "2",
        "LORAFLOW_MAX_ACTIVE_RUNS": "3",  # the three runs at once of the smoke sweep test
        # A killed worker stops heartbeating; notice it in seconds, not the default 5 min.
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT": "20",
        "AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT_DETECTION_INTERVAL": "3",
        # A broker restart loses the queued messages: send them again after 2 min, not 10.
        "AIRFLOW__SCHEDULER__TASK_QUEUED_TIMEOUT": "120",
        # The DAG file does not change during the tests: parse it at start, not every 30 s.
        "AIRFLOW__DAG_PROCESSOR__MIN_FILE_PROCESS_INTERVAL": "600",
        "HF_HUB_OFFLINE": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "LORAFLOW_PROGRESS": "0",
    }
    postgres = redis = None
    artifacts = home / "artifacts"
    artifacts.mkdir()
    disk = _small_disk(artifacts)
    try:
        # servers of the tests' own, which the faults below stop and start
        postgres = servers.Postgres().create()
        redis = servers.Redis().start()
        start = [sys.executable, str(SCRIPT), "--home", str(home), "start",
                 "--gpu-workers", str(GPU_WORKERS), "--default-concurrency", "4",
                 "--port", str(_free_port_block(3 + GPU_WORKERS)), "--postgres", postgres.url,
                 "--redis", redis.url, "--artifacts", str(artifacts),
                 "--reports", str(home / "reports"), "--timeout", "240"]
        started = subprocess.run(start, env=env, capture_output=True, text=True, timeout=600,
                                 check=False)
        assert started.returncode == 0, f"start failed:\n{started.stdout}\n{started.stderr}"
        state = cluster_processes.load_state(home)
        yield Cluster(home, state, cluster_api.Api(state["url"], cluster_env.secrets_of(home)["admin_password"]),
                      env, postgres, redis, disk)
    except BaseException:
        for log in sorted((home / "logs").glob("*.out")):
            print(f"--- {log.name} (tail) ---\n{cluster_processes.tail(log)}")
        raise
    finally:
        stop = [sys.executable, str(SCRIPT), "--home", str(home), "stop", "--grace", "10"]
        subprocess.run(stop, env=env, capture_output=True, timeout=120, check=False)
        try:
            if disk:
                _unmount(artifacts)
        finally:
            try:
                if redis:
                    redis.stop()
            finally:
                if postgres:
                    postgres.remove()


SMALL_DISK_MB = 768  # the cluster's artifacts root: room for every test, filled by one


def _small_disk(folder: Path) -> bool:
    """Mount a tmpfs of SMALL_DISK_MB at `folder` (root only): the disk the full-disk test
    fills. False where it cannot (that test then skips)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return False
    done = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={SMALL_DISK_MB}m", "tmpfs",
                           str(folder)], capture_output=True, check=False, timeout=30)
    return done.returncode == 0


def _unmount(folder: Path) -> None:
    if subprocess.run(["umount", str(folder)], capture_output=True, check=False,
                      timeout=60).returncode != 0:
        subprocess.run(["umount", "-l", str(folder)], check=True, timeout=60)  # busy: detach


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
    for name, worker in cluster.workers.items():  # tasks/preload.py, before the pool forks
        def preloaded(log=Path(worker["log"])):
            return [line for line in log.read_text(errors="replace").splitlines()
                    if "loraflow: the Celery worker imported the ML stack" in line]

        said = cluster_processes.wait_for(f"{name} to import the ML stack", preloaded, 120)
        assert len(said) == 1 and "not imported" not in said[0], (name, said)
    assert cluster.api.get(f"/api/v2/dags/{DAG_ID}")["is_paused"] is True  # as in docker/


@pytest.mark.timeout(540)
def test_smoke_sweep_and_two_runs_beside_it_share_the_gpu_workers(cluster):
    # Three runs at once, with run ids of their own and variants of the same names
    # (lora r2/r4, seed 1 and 2, majority): each trains and reports only its own.
    runs = {cluster.api.trigger(conf): conf for conf in (SMOKE_SWEEP, *BESIDE_THE_SWEEP)}
    assert len(runs) == 3
    finished = {run_id: cluster.api.wait(run_id, timeout=500) for run_id in runs}
    tis = {run_id: cluster.api.task_instances(run_id) for run_id in runs}
    for run_id, run in finished.items():
        print(cluster_api.run_table(cluster.api, run_id))
        assert run["state"] == "success", {(t["task_id"], t["map_index"]): t["state"] for t in tis[run_id]}

    # they ran at once
    assert all(_overlap(a, b) for a, b in combinations(finished.values(), 2)), finished

    sweep = next(r for r, conf in runs.items() if conf is SMOKE_SWEEP)
    ran = [t for t in tis[sweep] if t["state"] == "success"]
    gpu = [t for t in ran if t["queue"] == "gpu"]
    default = [t for t in ran if t["queue"] != "gpu"]
    assert len(gpu) >= 6 and default  # 2 ranks x 2 seeds of LoRA, 2 of full fine-tuning, ...
    # Each task instance ran on a worker of its queue.
    assert {t["hostname"] for t in gpu} <= cluster.hostnames("gpu")
    assert {t["hostname"] for t in default} == cluster.hostnames("default")
    assert all(t["pool"] == "gpu" for t in gpu)

    # Both gpu workers worked; two training tasks ran at once, never two on one worker,
    # whichever run they belong to.
    every_gpu = [t for run_tis in tis.values() for t in run_tis
                 if t["queue"] == "gpu" and t["state"] == "success"]
    assert {t["hostname"] for t in every_gpu} == cluster.hostnames("gpu")
    pairs = list(combinations(every_gpu, 2))
    assert any(_overlap(a, b) for a, b in pairs if a["hostname"] != b["hostname"])
    same_worker = [(a["task_id"], a["rendered_map_index"], b["task_id"], b["rendered_map_index"])
                   for a, b in pairs if a["hostname"] == b["hostname"] and _overlap(a, b)]
    assert same_worker == []

    metrics = cluster.metrics(sweep)
    trained = {v for v, m in metrics.items() if m["method"] in ("lora", "full_finetune")}
    assert len(trained) == 6  # lora r2/r4 x seeds 1/2, full fine-tuning x seeds 1/2
    # zero-shot has nothing to say on random weights: not_applicable, with its reason
    assert all(m["status"] == ("not_applicable" if m["method"] == "zero_shot" else "ok")
               for m in metrics.values()), metrics

    # Each run has its own folder, results and report; a shared variant name is trained
    # once per run, and no run's files name another run.
    variants = {run_id: set(cluster.metrics(run_id)) for run_id in runs}
    for run_id in runs:
        assert variants[run_id] == _planned_variants(tis[run_id]), run_id
        assert all(m["status"] == "ok" for m in cluster.metrics(run_id).values()
                   if m["method"] != "zero_shot")
        summary = json.loads(cluster.report(run_id).with_name("summary.json").read_text())
        assert summary["run_id"] == run_id
        assert Path(summary["run_dir"]) == cluster.run_dir(run_id).resolve()
    for run_id in runs:  # the small runs share LoRA variant names with the sweep
        assert run_id == sweep or {v for v in variants[run_id] & variants[sweep] if v.startswith("lora")}
    assert len({cluster.report(r) for r in runs}) == 3


def _planned_variants(tis: list[dict]) -> set[str]:
    """The variant names of a run's mapped per-variant task instances (their map index
    template is the variant's name)."""
    return {t["rendered_map_index"] for t in tis
            if t["map_index"] >= 0 and t["rendered_map_index"] and not t["rendered_map_index"].isdigit()}


def _kill_worker(pid: int) -> list:
    """SIGKILL a worker the way a lost machine dies: every process of its session (Celery's
    main and pool processes, its log server, the task process in its own process group)."""
    procs = cluster_processes.processes_in_sessions({pid})
    for proc in procs:
        proc.kill()
    return procs


# --- faults while a variant trains ----------------------------------------------------------
# One run takes them one after another, each while a gpu task trains a variant: a gpu worker
# SIGKILLed (a lost machine), then the control plane: scheduler, broker, metadata database,
# API server. After each, the test does what an operator does (start again what exited,
# wait until the cluster reports healthy); at the end it clears what Airflow failed.

@dataclass
class Fault:
    name: str
    inject: Callable[[Cluster, str, dict], str]  # (cluster, run id, training task): what it did
    at_s: float | None = None  # seconds into the run
    variant: str = ""
    ti: dict | None = None  # the gpu task instance that was training
    notes: list[str] = field(default_factory=list)
    recovery_s: float | None = None


def _quietly(call, *args):
    """A REST call that may fail while the API server or its database is down: None then."""
    import httpx

    try:
        return call(*args)
    except (httpx.HTTPError, ValueError):
        return None


def _restart(cluster: Cluster, name: str, kill: bool = False) -> None:
    cmd = [sys.executable, str(SCRIPT), "--home", str(cluster.home), "restart", name,
           *(["--kill"] if kill else []), "--timeout", "180"]
    done = subprocess.run(cmd, env=cluster.env, capture_output=True, text=True, timeout=240,
                          check=False)
    assert done.returncode == 0, f"restart {name} failed:\n{done.stdout}\n{done.stderr}"
    cluster.state.update(cluster_processes.load_state(cluster.home))


def _scheduler_killed(cluster: Cluster, run_id: str, ti: dict) -> str:
    _restart(cluster, "scheduler", kill=True)
    return "scheduler session SIGKILLed, started again"


def _broker_restarted(cluster: Cluster, run_id: str, ti: dict) -> str:
    logs = {Path(e["log"]): Path(e["log"]).stat().st_size for e in cluster.workers.values()
            if cluster_processes.process_of(e)}
    cluster.redis.stop()  # SIGKILL, nothing on disk: queued messages and results are gone
    time.sleep(3)
    cluster.redis.start()
    back = time.time()

    def reconnected():
        # Celery's "Connected to <broker url>" (the URL masked in Airflow's logs)
        return all(b"] Connected to " in log.read_bytes()[offset:] for log, offset in logs.items())

    cluster_processes.wait_for("the workers to reconnect to the broker", reconnected, 120)
    # The queued task instances' messages went with the broker: Airflow would send them
    # again after [scheduler] task_queued_timeout; an operator clears them at once.
    queued = [t for t in cluster.api.task_instances(run_id) if t["state"] == "queued"
              and t["queued_when"] and _at(t["queued_when"]).timestamp() < back]
    if queued:
        _clear(cluster, run_id, queued, why="queued, their messages lost with the broker",
               downstream=False)
    return (f"Redis killed, 3 s down, started empty; {len(logs)} workers reconnected; "
            f"{len(queued)} queued task instances cleared")


def _database_restarted(cluster: Cluster, run_id: str, ti: dict) -> str:
    cluster.postgres.stop("fast")  # every session cut off
    time.sleep(3)
    cluster.postgres.start()
    return "PostgreSQL stopped (fast), 3 s down, started"


def _api_server_killed(cluster: Cluster, run_id: str, ti: dict) -> str:
    _restart(cluster, "api-server", kill=True)
    return "api-server session SIGKILLed, started again"


def _fill(folder: Path) -> Path:
    """Append zeros to `folder`/filler.bin until its filesystem is full, to the last page
    (a small LoRA checkpoint fits in less than a MiB); the file that holds them."""
    filler = folder / "filler.bin"
    with open(filler, "ab", buffering=0) as f:
        for chunk in (b"\0" * (1 << 20), b"\0" * 4096):
            try:
                while True:
                    f.write(chunk)
            except OSError as err:
                assert err.errno == errno.ENOSPC, err
    return filler


def _disk_filled(cluster: Cluster, run_id: str, ti: dict) -> str:
    """Fill the artifacts root (a tmpfs of its own) until the training try fails; it must
    say why, naming the path, and leave nothing half-written that looks complete; then
    free the space."""
    root = cluster.state["artifacts"]
    out = cluster.run_dir(run_id) / "results" / ti["rendered_map_index"]
    filler = _fill(Path(root))
    try:
        def this_try_failed():
            # The other variants' writes fail too and remove their temporary files: take
            # that space again at once, or the next checkpoint fits in it and training goes on.
            _fill(Path(root))
            return [x for x in _quietly(cluster.api.tries, run_id, ti) or []
                    if x["try_number"] == ti["try_number"] and x["state"] in ("failed", "up_for_retry")]

        failed = cluster_processes.wait_for("the training try to fail", this_try_failed, 300,
                                            every=0.5)[0]
        log = _quietly(cluster.api.log, run_id, failed, failed["try_number"]) or []
        said = [line for line in log if f"no space left on device writing {root}" in line]
        assert said, "\n".join(log)
        record = out / "metrics.json"
        assert not record.exists() or json.loads(record.read_text())["status"] != "ok"
        assert not [p for p in out.rglob(".*") if p.name.endswith(".tmp")]
    finally:
        filler.unlink()
    return (f"artifacts tmpfs filled; try {failed['try_number']} failed: "
            f"\"{said[0].split(': ', 1)[-1].replace(root, '<artifacts>')[:150]}\"; space freed")


CONTROL_PLANE_FAULTS = (("scheduler killed", _scheduler_killed),
                        ("broker restarted", _broker_restarted),
                        ("metadata DB restarted", _database_restarted),
                        ("API server killed", _api_server_killed),
                        ("disk full", _disk_filled))  # where the artifacts root is a tmpfs


def _trains(variant: str) -> bool:
    """Whether the variant is of a method that trains (LoRA, full fine-tuning, ...)."""
    trained = [m.name for m in registry.METHODS.values() if m.kind == "trained"]
    return any(variant == m or variant.startswith(m + "_") for m in trained)


def _training(cluster: Cluster, run_id: str, lost: set[str]) -> dict | None:
    """A gpu task instance that runs on a live worker and trains a variant not done yet."""
    tis = _quietly(cluster.api.task_instances, run_id) or []
    results = cluster.run_dir(run_id) / "results"
    for t in sorted(tis, key=lambda t: t["start_date"] or ""):
        variant = t.get("rendered_map_index") or ""
        if (t["queue"] == "gpu" and t["state"] == "running" and t["hostname"]
                and t["hostname"] not in lost and _trains(variant)
                and not (results / variant / "metrics.json").exists()):
            return t
    return None


def _epochs_done(cluster: Cluster, run_id: str, variant: str) -> str:
    found = sorted((cluster.run_dir(run_id) / "results" / variant / "checkpoints").glob("epoch-*"))
    return f"after epoch {int(found[-1].name.split('-')[1])}" if found else "epoch 1"


def _healthy_since(health: dict, since: float) -> bool:
    """Every job healthy, with a heartbeat written after `since` (a killed scheduler's last
    heartbeat keeps it `healthy` for 30 s; after the database restarted, each job wrote again)."""
    for job in ("scheduler", "triggerer", "dag_processor"):
        beats = [v for k, v in health.get(job, {}).items() if k.startswith("latest_") and v]
        if health[job].get("status") != "healthy" or not beats or _at(beats[0]).timestamp() <= since:
            return False
    return health.get("metadatabase", {}).get("status") == "healthy"


def _recover(cluster: Cluster, lost: set[str], since: float, timeout: float = 240) -> list[str]:
    """What an operator does: start again every component that exited (but the lost
    workers), until the health endpoint reports every job healthy, twice in a row, with
    heartbeats written after the fault was injected (`since`)."""
    import httpx

    notes: list[str] = []
    deadline = time.monotonic() + timeout
    healthy_checks = 0
    while healthy_checks < 2:
        assert time.monotonic() < deadline, f"the cluster is not healthy after {timeout} s: {notes}"
        for name, entry in dict(cluster.state["components"]).items():
            if name not in lost and not cluster_processes.process_of(entry):
                notes.append(f"{name} exited: restarted")
                _restart(cluster, name)
        try:
            health = httpx.get(f"{cluster.state['url']}/api/v2/monitor/health", timeout=5).json()
            ok = _healthy_since(health, since)
        except (httpx.HTTPError, ValueError, KeyError):
            ok = False
        healthy_checks = healthy_checks + 1 if ok else 0
        time.sleep(1.5)
    return notes


def _clear(cluster: Cluster, run_id: str, tis: list[dict], why: str = "failed",
           downstream: bool = True) -> None:
    """What an operator does: clear task instances (failed ones: and what runs after them,
    the report), and the run goes on."""
    print(f"clearing {[(t['task_id'], t['rendered_map_index']) for t in tis]} ({why})"
          + (" and what runs after them" if downstream else ""))
    cluster.api.client.post(f"/api/v2/dags/{DAG_ID}/clearTaskInstances", json={
        "dry_run": False, "dag_run_id": run_id, "only_failed": False,
        "task_ids": [[t["task_id"], t["map_index"]] if t["map_index"] >= 0 else t["task_id"]
                     for t in tis],
        "include_downstream": downstream, "reset_dag_runs": True}).raise_for_status()


def _training_or_clear(cluster: Cluster, run_id: str, lost: set[str], cleared: list[dict],
                       fault: str) -> dict | None:
    """A gpu task training; where an earlier fault failed the run, clear it first."""
    run = _quietly(cluster.api.run, run_id)
    if run and run["state"] == "success":
        raise AssertionError(f"the run ended before `{fault}` could be injected: make FAULT_RUN longer")
    if run and run["state"] == "failed":
        failed = [t for t in cluster.api.task_instances(run_id) if t["state"] == "failed"]
        cleared += failed
        _clear(cluster, run_id, failed)
        return None
    return _training(cluster, run_id, lost)


def _inject(cluster: Cluster, fault: Fault, run_id: str, started: float, lost: set[str],
            cleared: list[dict]) -> None:
    ti = cluster_processes.wait_for(
        f"a gpu task training (for: {fault.name})",
        lambda: _training_or_clear(cluster, run_id, lost, cleared, fault.name), timeout=300, every=0.5)
    fault.ti, fault.variant = ti, ti["rendered_map_index"]
    fault.variant += f" ({_epochs_done(cluster, run_id, fault.variant)})"
    fault.at_s = time.time() - started
    t0, since = time.monotonic(), time.time()
    fault.notes.append(fault.inject(cluster, run_id, ti))
    fault.notes += _recover(cluster, lost, since)
    fault.recovery_s = time.monotonic() - t0


def _finish(cluster: Cluster, run_id: str, timeout: float,
            cleared: list[dict] | None = None) -> tuple[dict, list[dict]]:
    """Wait for the run's end; where it failed, clear its failed task instances (what an
    operator does) and wait again, twice at most. The run and the cleared task instances."""
    cleared = [] if cleared is None else cleared
    for _ in range(3):
        run = cluster_processes.wait_for(
            f"run {run_id}", lambda: (r := _quietly(cluster.api.run, run_id)) and
            r["state"] in ("success", "failed") and r, timeout, every=2)
        if run["state"] == "success":
            return run, cleared
        failed = [t for t in cluster.api.task_instances(run_id) if t["state"] == "failed"]
        cleared += failed
        _clear(cluster, run_id, failed)
    return run, cleared


def _tries_text(tries: list[dict], name_of: dict[str, str], started: float) -> str:
    def end(x):
        return f" at {_at(x['end_date']).timestamp() - started:.0f} s" if x["end_date"] else ""

    return ", ".join(f"try {x['try_number']} {x['state']} on {name_of.get(x['hostname'], x['hostname'])}{end(x)}"
                     for x in sorted(tries, key=lambda x: x["try_number"]))


def _fault_table(faults: list[Fault], tries: dict, cleared: set, metrics: dict,
                 name_of: dict[str, str], started: float) -> str:
    rows = [("fault", "injected at", "what happened", "outcome", "recovery s", "results lost")]
    for f in faults:
        key = (f.ti["task_id"], f.ti["map_index"])
        variant = f.ti["rendered_map_index"]
        history = tries[key]
        refused = [x["try_number"] for x in history if x.get("refused")]
        if refused:
            f.notes.append(f"tries {refused} refused by the variant lock (another process trained it)")
        last = max(history, key=lambda x: x["try_number"])
        outcome = f"{variant}: {last['state']}" + (" after clearing" if key in cleared else "")
        lost = 0 if metrics.get(variant, {}).get("status") in ("ok", "not_applicable") else 1
        rows.append((f.name, f"{f.at_s:.0f} s, {f.variant}",
                     "; ".join([*f.notes, _tries_text(history, name_of, started)]), outcome,
                     f"{f.recovery_s:.0f}", str(lost)))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(" | ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows)


def _holds_no_lock(lock_file: Path) -> bool:
    fd = os.open(lock_file, os.O_RDWR)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        return True
    except BlockingIOError:
        return False
    finally:
        os.close(fd)


@pytest.mark.timeout(1200)
def test_faults_while_training_lose_nothing(cluster):
    import psutil

    run_id = cluster.api.trigger(FAULT_RUN)
    results = cluster.run_dir(run_id) / "results"
    started = _at(cluster_processes.wait_for(
        "the run to start", lambda: cluster.api.run(run_id)["start_date"], 120)).timestamp()
    name_of = {c["hostname"]: n for n, c in cluster.workers.items()}

    def gpu_tasks_past_their_first_epoch():
        """The running gpu task instances, once each of them trains a variant that has
        finished an epoch: killing any of them then interrupts a resumable training."""
        gpu = [t for t in cluster.api.task_instances(run_id) if t["queue"] == "gpu"]
        assert not [t for t in gpu if t["state"] in ("failed", "upstream_failed")], gpu
        running = [t for t in gpu if t["state"] == "running" and t["hostname"]]
        training = {d.name for d in results.glob("*") if any(d.glob("checkpoints/epoch-*"))
                    and not (d / "metrics.json").exists()}
        return running if running and len(training) == len(running) else None

    # 1. a gpu worker lost: SIGKILL every process of its session
    running = cluster_processes.wait_for("gpu tasks past their first epoch", gpu_tasks_past_their_first_epoch,
                                         timeout=400, every=0.5)
    # The one that started last has the most training left.
    victim_ti = max(running, key=lambda t: t["start_date"])
    victim = victim_ti["hostname"]
    name = name_of[victim]
    pid = cluster.state["components"][name]["pid"]
    worker_fault = Fault(f"worker {name} killed", lambda *_: "", ti=victim_ti,
                         variant=f"{victim_ti['rendered_map_index']} "
                                 f"({_epochs_done(cluster, run_id, victim_ti['rendered_map_index'])})")
    killed_at = time.time()
    worker_fault.at_s = killed_at - started
    gone = _kill_worker(pid)
    _, alive = psutil.wait_procs(gone, timeout=10)
    assert alive == [] and cluster_processes.processes_in_sessions({pid}) == []
    worker_fault.notes.append(f"{len(gone)} processes SIGKILLed, worker left dead")
    lost = {name, victim}
    t0 = time.monotonic()

    def killed_try_given_up():
        """Airflow noticed (no heartbeat): the task instance no longer runs on the victim."""
        now = next(t for t in cluster.api.task_instances(run_id)
                   if (t["task_id"], t["map_index"]) == (victim_ti["task_id"], victim_ti["map_index"]))
        return now["state"] != "running" or now["hostname"] != victim

    cluster_processes.wait_for("Airflow to give the killed try up", killed_try_given_up, 300)
    worker_fault.recovery_s = time.monotonic() - t0

    # 2. the control plane, one fault after the other, each while a variant trains
    faults, cleared = [worker_fault], []
    for fault_name, inject in CONTROL_PLANE_FAULTS:
        if inject is _disk_filled and not cluster.small_disk:
            print("disk full: not injected (the artifacts root is no tmpfs: needs root and mount)")
            continue
        fault = Fault(fault_name, inject)
        _inject(cluster, fault, run_id, started, lost, cleared)
        faults.append(fault)

    run, cleared = _finish(cluster, run_id, timeout=600, cleared=cleared)
    tis = cluster.api.task_instances(run_id)
    print(cluster_api.run_table(cluster.api, run_id))
    assert run["state"] == "success", {(t["task_id"], t["map_index"]): t["state"] for t in tis}

    tries = {(t["task_id"], t["map_index"]): cluster.api.tries(run_id, t)
             for t in tis if t["queue"] == "gpu"}
    for x in (x for history in tries.values() for x in history if x["state"] == "failed"):
        x["refused"] = any("is in use by" in line
                           for line in _quietly(cluster.api.log, run_id, x, x["try_number"]) or [])
    metrics = cluster.metrics(run_id)
    print(f"\nfaults injected into run {run_id} (2-core machine; cleared at the end: "
          f"{[(t['task_id'], t['rendered_map_index']) for t in cleared]})")
    print(_fault_table(faults, tries, {(t["task_id"], t["map_index"]) for t in cleared},
                       metrics, name_of, started))

    # Airflow noticed the lost worker: the killed try failed (it stopped heartbeating), and a
    # retry on the surviving worker resumed from the variant's epoch checkpoint.
    # The killed try failed; a retry on the surviving worker finished it. (A try lost with
    # the broker's queue and cleared never started: it keeps the killed try's host and times.)
    history = tries[(victim_ti["task_id"], victim_ti["map_index"])]
    killed = next(x for x in history if x["try_number"] == victim_ti["try_number"])
    assert killed["state"] == "failed" and killed["hostname"] == victim, history
    later = [x for x in history if x["try_number"] > killed["try_number"]]
    assert max(later, key=lambda x: x["try_number"])["state"] == "success", history
    ran_later = [x for x in later if x["start_date"] != killed["start_date"]]
    assert ran_later and {x["hostname"] for x in ran_later} <= cluster.hostnames("gpu") - {victim}
    # The other tries on the victim ended before it died.
    assert all(_at(x["end_date"]).timestamp() < killed_at for h in tries.values() for x in h
               if x["hostname"] == victim and x["start_date"] != killed["start_date"])
    logs = [line for x in ran_later for line in _quietly(cluster.api.log, run_id, x, x["try_number"]) or []]
    assert any("resuming after epoch" in line for line in logs), "\n".join(logs)
    # Nothing started on the dead worker after it died.
    assert all(_at(t["start_date"]).timestamp() < killed_at
               for t in tis if t["hostname"] == victim)

    # No variant trained by two tries at once: the tries of one task instance follow each
    # other, and each variant's lock names one holder and is free now.
    for history in tries.values():
        ran = {x["start_date"]: x for x in sorted(history, key=lambda x: -x["try_number"])
               if x["start_date"] and x["end_date"]}  # a try that never ran copies its predecessor's
        spans = sorted(ran.values(), key=lambda x: x["start_date"])
        assert all(_at(a["end_date"]) <= _at(b["start_date"]) for a, b in zip(spans, spans[1:])), history
    locks = list((cluster.run_dir(run_id) / ".locks").glob("*.lock"))
    assert {p.stem for p in locks} >= {v for v in metrics if _trains(v)}
    for lock in locks:
        assert re.fullmatch(r"process \d+ on \S+", lock.read_text().strip()), lock
        assert _holds_no_lock(lock), f"{lock} is still held"

    # Results lost: none. Every variant has its result; the report was written.
    assert set(metrics) == _planned_variants(tis)
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
