#!/usr/bin/env python3
"""loraflow on Airflow's CeleryExecutor, as real processes on this machine (`make cluster`).

    python scripts/loraflow_cluster.py start [--gpu-workers N] [--port 8380] ...
    python scripts/loraflow_cluster.py status
    python scripts/loraflow_cluster.py trigger '{"preset": "smoke"}' [--wait]
    python scripts/loraflow_cluster.py stop

What `start` runs, each component in a session of its own (PIDs in <home>/cluster.json):
- metadata database: its own PostgreSQL database (`loraflow_airflow`, created here);
  Redis is the Celery broker and result backend;
- api-server (UI, REST and Task Execution API), scheduler, dag-processor, triggerer;
- Celery worker `default` on queue `default`, and workers `gpu-0` .. `gpu-<N-1>` on queue
  `gpu` with concurrency k (LORAFLOW_TASKS_PER_GPU or --tasks-per-gpu, a number or `auto`:
  tasks/slots.py; 1 for a worker without a GPU), each with its own CUDA_VISIBLE_DEVICES;
  N = the GPUs that nvidia-smi lists, 2 on a CPU-only machine (--gpu-workers);
- pool `gpu` with the workers' concurrencies summed (N x k) slots; every component gets
  the resolved k, so the lease in each task admits k tasks per GPU; one artifacts and
  reports root for all.

The settings every deployment shares come from docker/airflow.env and the one-time init
(Fernet key, admin password, db migrate, pool) from docker/airflow-init.sh, both also used
by docker compose. Airflow settings already in the environment (e.g.
AIRFLOW__SCHEDULER__TASK_INSTANCE_HEARTBEAT_TIMEOUT) pass through to every component.

Several workers share this host, so each gets its own Celery hostname, log-server port and,
through [core] hostname_callable = loraflow_cluster.worker_hostname, its own name in the
task instances it runs (`gpu-0.<host>`): the REST API shows which worker ran what.
Each component runs in a session of its own, which its task processes (in process groups
of their own) stay in: `stop` ends every process of those sessions, by PID.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import quote

ROOT = Path(__file__).resolve().parents[1]
SHARED_SETTINGS = ROOT / "docker" / "airflow.env"
INIT_SCRIPT = ROOT / "docker" / "airflow-init.sh"
DAG_ID = "lora_imdb_experiment"
ADMIN = "admin"


def worker_hostname() -> str:
    """[core] hostname_callable of the cluster: `<worker>.<host>` in a Celery worker (and the
    task processes it starts), the host's name elsewhere. Must stay importable on its own."""
    host = socket.gethostname()
    worker = os.environ.get("LORAFLOW_WORKER_NAME")
    return f"{worker}.{host}" if worker else host


# --- configuration --------------------------------------------------------------------------


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines; `#` comments and blank lines skipped (docker/airflow.env)."""
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def gpu_count() -> int:
    if not shutil.which("nvidia-smi"):
        return 0
    out = subprocess.run(["nvidia-smi", "-L"], capture_output=True, text=True, check=False).stdout
    return sum(line.startswith("GPU") for line in out.splitlines())


@dataclass
class Component:
    name: str
    args: list[str]  # after `airflow`
    env: dict[str, str] = field(default_factory=dict)  # on top of the shared settings
    queue: str | None = None  # Celery workers only


def tasks_per_gpu(opts: argparse.Namespace) -> int:
    """k: --tasks-per-gpu, else LORAFLOW_TASKS_PER_GPU, resolved against this host's GPUs."""
    sys.path.insert(0, str(ROOT))  # tasks.slots: standard library only
    from tasks import slots

    value = slots.parse(opts.tasks_per_gpu) if opts.tasks_per_gpu else slots.setting()
    return slots.resolve(value, slots.nvidia_smi_gpus())


def gpu_worker_concurrency(opts: argparse.Namespace, gpus: int, index: int) -> int:
    """k for a worker with a GPU of its own, 1 for one that trains on the CPU."""
    return (getattr(opts, "resolved_tasks_per_gpu", None) or 1) if index < gpus else 1


def pool_slots(opts: argparse.Namespace, gpus: int) -> int:
    """Pool `gpu`: as many slots as the gpu workers run tasks at once."""
    return sum(gpu_worker_concurrency(opts, gpus, i) for i in range(opts.gpu_workers))


def components(opts: argparse.Namespace, gpus: int) -> list[Component]:
    """The control plane, then the workers. Ports: API on --port, log servers above it."""
    port = opts.port
    control = [
        Component("api-server", ["api-server", "--host", opts.host, "--port", str(port)]),
        Component("scheduler", ["scheduler"]),
        Component("dag-processor", ["dag-processor"]),
        Component("triggerer", ["triggerer"]),
    ]
    workers = [("default", "default", opts.default_concurrency, {})]
    for i in range(opts.gpu_workers):
        # A GPU of its own (none beyond the GPUs there are); on a CPU-only machine, a share
        # of the cores.
        env = {"CUDA_VISIBLE_DEVICES": str(i) if i < gpus else ""}
        if not gpus and "OMP_NUM_THREADS" not in os.environ:
            env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // opts.gpu_workers))
        workers.append((f"gpu-{i}", "gpu", gpu_worker_concurrency(opts, gpus, i), env))
    for offset, (name, queue, concurrency, env) in enumerate(workers, start=2):
        control.append(Component(
            name, ["celery", "worker", "--queues", queue, "--concurrency", str(concurrency),
                   "--celery-hostname", f"{name}@%h"],
            env={**env, "LORAFLOW_WORKER_NAME": name,
                 "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(port + offset)},
            queue=queue))
    return control


def secrets_of(home: Path) -> dict[str, str]:
    """This deployment's secrets, generated on the first start and kept in <home>/auth."""
    path = home / "auth" / "secrets.json"
    if path.exists():
        return json.loads(path.read_text())
    values = {name: secrets.token_urlsafe(32)
              for name in ("jwt_secret", "api_secret_key", "admin_password")}
    path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    path.touch(mode=0o600)
    path.write_text(json.dumps(values))
    return values


def postgres_url(opts: argparse.Namespace, driver: str = "postgresql+psycopg2") -> str:
    server = opts.postgres.split("://", 1)[1].rstrip("/")
    return f"{driver}://{server}/{opts.database}"


def settings(opts: argparse.Namespace, home: Path) -> dict[str, str]:
    """Environment of every component: the caller's, docker/airflow.env, then this
    deployment's addresses, secrets and paths."""
    keys = secrets_of(home)
    url = f"http://{opts.host}:{opts.port}"
    redis_options = {}
    if opts.redis_prefix:  # keeps several clusters (or test runs) on one Redis apart
        for section in ("CELERY_BROKER_TRANSPORT_OPTIONS", "CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS"):
            redis_options[f"AIRFLOW__{section}__GLOBAL_KEYPREFIX"] = opts.redis_prefix
    venv_bin = str(Path(sys.executable).parent)
    return {
        **os.environ,
        **read_env_file(SHARED_SETTINGS),
        **redis_options,
        "AIRFLOW_HOME": str(home),
        "AIRFLOW__CORE__DAGS_FOLDER": str(ROOT / "dags"),
        "AIRFLOW__DATABASE__SQL_ALCHEMY_CONN": postgres_url(opts),
        "AIRFLOW__CELERY__BROKER_URL": opts.redis,
        "AIRFLOW__CELERY__RESULT_BACKEND": opts.redis,
        # Every component signs and checks Task Execution API tokens with this one secret.
        "AIRFLOW__API_AUTH__JWT_SECRET": keys["jwt_secret"],
        "AIRFLOW__API__SECRET_KEY": keys["api_secret_key"],
        "AIRFLOW__API__BASE_URL": url,
        "AIRFLOW__API__WORKERS": "1",
        "AIRFLOW__CORE__EXECUTION_API_SERVER_URL": f"{url}/execution/",
        "AIRFLOW__CORE__FERNET_KEY_CMD": f"cat {shlex.quote(str(home / 'auth' / 'fernet.key'))}",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_USERS": f"{ADMIN}:admin",
        "AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_PASSWORDS_FILE": str(home / "auth" / "passwords.json"),
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": "loraflow_cluster.worker_hostname",
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(opts.port + 1),
        "LORAFLOW_ARTIFACTS": str(Path(opts.artifacts).resolve()),
        "LORAFLOW_REPORTS": str(Path(opts.reports).resolve()),
        # the lease in every task admits as many tasks per GPU as the pool and workers do
        "LORAFLOW_TASKS_PER_GPU": str(getattr(opts, "resolved_tasks_per_gpu", None) or 1),
        # The project importable as `tasks` (as in scripts/airflow_env.sh), this file as
        # `loraflow_cluster` (the hostname callable), and the venv's `airflow` and `python`.
        "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), str(ROOT / "scripts"),
                                                    os.environ.get("PYTHONPATH")])),
        "PATH": os.pathsep.join([venv_bin, os.environ.get("PATH", "")]),
    }


# --- processes --------------------------------------------------------------------------------


def state_path(home: Path) -> Path:
    return home / "cluster.json"


def load_state(home: Path) -> dict:
    path = state_path(home)
    return json.loads(path.read_text()) if path.exists() else {}


def save_state(home: Path, state: dict) -> None:
    tmp = state_path(home).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(state_path(home))


def process_of(entry: dict):
    """The recorded process if it still runs (same PID *and* start time: PIDs are reused)."""
    import psutil

    try:
        proc = psutil.Process(entry["pid"])
        if abs(proc.create_time() - entry["started"]) < 1 and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
    except psutil.Error:
        pass
    return None


def processes_in_sessions(sessions: set[int]) -> list:
    """Every process in these sessions. Each component starts one (its PID is the session's
    id) and everything below it stays there: Celery pool processes, log servers, and task
    processes, which run in process groups of their own, even once orphaned."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) in sessions:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def kill(procs: list, grace_s: float) -> None:
    """SIGTERM the process groups of `procs` (and each process), wait up to grace_s for them
    to exit, then SIGKILL whatever is left."""
    import psutil

    own_group = os.getpgid(0)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in procs if p.is_running()]
        groups = set()
        for p in alive:
            try:
                groups.add(os.getpgid(p.pid))
            except ProcessLookupError:
                continue
        for group in groups - {own_group}:
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                pass
        for p in alive:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        _, procs = psutil.wait_procs(alive, timeout=grace_s if sig == signal.SIGTERM else 10)
        if not procs:
            return
        if sig == signal.SIGTERM:
            names = sorted({_name(p) for p in procs})
            print(f"  still up {grace_s:.0f} s after SIGTERM, SIGKILL: {', '.join(names)}")


def _name(proc) -> str:
    import psutil

    try:
        return " ".join(proc.cmdline())[:60] or proc.name()
    except psutil.Error:  # gone meanwhile
        return str(proc.pid)


def tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_for(what: str, check, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


# --- the REST API -----------------------------------------------------------------------------


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
        created = self.client.post(f"/api/v2/dags/{DAG_ID}/dagRuns",
                                   json={"logical_date": None, "conf": conf})
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
    lines = [f"run {run_id}: {run['state']}, {len(rows)} task instances, times in s from the run's start",
             f"{'task':<34} {'queue':<8} {'worker':<28} {'queued':>6} {'start':>6} {'end':>6} "
             f"{'wait':>5} {'try':>3}"]
    for t in rows:
        name = t["task_id"] + (f"[{t['rendered_map_index'] or t['map_index']}]"
                               if t["map_index"] >= 0 else "")
        wait = (f"{(datetime.fromisoformat(t['start_date']) - datetime.fromisoformat(t['queued_when'])).total_seconds():5.1f}"
                if t.get("queued_when") and t["start_date"] else "    -")
        lines.append(f"{name[:34]:<34} {t['queue'] or '-':<8} {(t['hostname'] or '-')[:28]:<28} "
                     f"{offset(t.get('queued_when'))} {offset(t['start_date'])} "
                     f"{offset(t['end_date'])} {wait} {t['try_number']:>3}")
    if run["end_date"]:
        wall = (datetime.fromisoformat(run["end_date"]) - t0).total_seconds()
        lines.append(f"wall time (run start to end): {wall:.1f} s")
    return "\n".join(lines)


# --- commands ---------------------------------------------------------------------------------


def create_database(opts: argparse.Namespace) -> None:
    """CREATE DATABASE <name> unless it exists (connecting to the server's `postgres`
    database for that statement only)."""
    import psycopg2

    conn = psycopg2.connect(postgres_url(opts, "postgresql").rsplit("/", 1)[0] + "/postgres")
    conn.autocommit = True
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT 1 FROM pg_database WHERE datname = %s", (opts.database,))
            if cur.fetchone() is None:
                cur.execute(f'CREATE DATABASE "{opts.database}"')
                print(f"created PostgreSQL database {opts.database}")
    finally:
        conn.close()


def start(opts: argparse.Namespace) -> int:
    import psutil

    home = Path(opts.home).resolve()
    state = load_state(home)
    if any(process_of(entry) for entry in state.get("components", {}).values()):
        print(f"a cluster is already running from {home} (make cluster-stop)", file=sys.stderr)
        return 1
    (home / "logs").mkdir(parents=True, exist_ok=True)
    gpus = gpu_count()
    if opts.gpu_workers is None:
        opts.gpu_workers = gpus or 2
    try:
        opts.resolved_tasks_per_gpu = tasks_per_gpu(opts)
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    plan = components(opts, gpus)
    ports = [opts.port, opts.port + 1, *(int(c.env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"])
                                         for c in plan if c.queue)]
    for port in ports:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                print(f"port {port} is taken; choose another --port (uses {ports[0]}..{ports[-1]})",
                      file=sys.stderr)
                return 1

    env = settings(opts, home)
    create_database(opts)
    init_env = {**env, "LORAFLOW_AUTH_DIR": str(home / "auth"), "AIRFLOW_ADMIN_USER": ADMIN,
                "AIRFLOW_ADMIN_PASSWORD": secrets_of(home)["admin_password"],
                # already counted per worker (k with a GPU, 1 without): no second factor
                "GPU_POOL_SLOTS": str(pool_slots(opts, gpus)), "LORAFLOW_TASKS_PER_GPU": "1"}
    init_log = home / "logs" / "init.log"
    with open(init_log, "wb") as log:
        if subprocess.run(["bash", str(INIT_SCRIPT)], env=init_env, stdout=log,
                          stderr=subprocess.STDOUT, check=False).returncode != 0:
            print(f"init failed:\n{tail(init_log)}", file=sys.stderr)
            return 1

    state = {"home": str(home), "url": f"http://{opts.host}:{opts.port}", "database": opts.database,
             "redis": opts.redis, "gpu_workers": opts.gpu_workers, "gpus": gpus,
             "tasks_per_gpu": opts.resolved_tasks_per_gpu, "pool_slots": pool_slots(opts, gpus),
             "artifacts": env["LORAFLOW_ARTIFACTS"], "reports": env["LORAFLOW_REPORTS"],
             "components": {}}
    for c in plan:
        out = home / "logs" / f"{c.name}.out"
        with open(out, "ab") as log:
            proc = subprocess.Popen([str(Path(sys.executable).parent / "airflow"), *c.args],
                                    env={**env, **c.env}, stdout=log, stderr=subprocess.STDOUT,
                                    stdin=subprocess.DEVNULL, start_new_session=True, cwd=home)
        state["components"][c.name] = {
            "pid": proc.pid, "started": psutil.Process(proc.pid).create_time(), "log": str(out),
            "queue": c.queue, "hostname": worker_hostname_of(c),
            "cuda_visible_devices": c.env.get("CUDA_VISIBLE_DEVICES")}
        save_state(home, state)

    try:
        wait_until_ready(state, home, opts.timeout)
    except (TimeoutError, RuntimeError) as e:
        print(f"error: {e}; stopping the cluster", file=sys.stderr)
        stop_cluster(home, grace_s=10)
        return 1
    print_summary(state, home)
    return 0


def worker_hostname_of(c: Component) -> str | None:
    return f"{c.name}.{socket.gethostname()}" if c.queue else None


def wait_until_ready(state: dict, home: Path, timeout: float) -> None:
    """The API answers, every job reports healthy, every worker is ready, the DAG is parsed."""
    import httpx

    def alive() -> None:
        for name, entry in state["components"].items():
            if not process_of(entry):
                raise RuntimeError(f"airflow {name} exited:\n{tail(Path(entry['log']))}")

    def healthy():
        alive()
        try:
            health = httpx.get(f"{state['url']}/api/v2/monitor/health", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return False
        return all(health.get(job, {}).get("status") == "healthy"
                   for job in ("metadatabase", "scheduler", "triggerer", "dag_processor"))

    def workers_ready():
        alive()
        return all(" ready." in Path(e["log"]).read_text(errors="replace")
                   for e in state["components"].values() if e["queue"])

    wait_for("the API server, scheduler, triggerer and DAG processor", healthy, timeout)
    wait_for("the Celery workers", workers_ready, timeout)
    api = Api(state["url"], secrets_of(home)["admin_password"])
    wait_for(f"the DAG processor to register {DAG_ID}",
             lambda: api.client.get(f"/api/v2/dags/{DAG_ID}").status_code == 200, timeout)


def print_summary(state: dict, home: Path) -> None:
    print(f"\n  Airflow (CeleryExecutor) at {state['url']}/dags/{DAG_ID}")
    print(f"  username {ADMIN}, password {secrets_of(home)['admin_password']}  "
          f"(in {home / 'auth' / 'passwords.json'})")
    print(f"  metadata database {state['database']} (PostgreSQL), broker {state['redis']}")
    print(f"  artifacts {state['artifacts']}, reports {state['reports']}")
    for name, entry in state["components"].items():
        extra = f"queue {entry['queue']}, tasks show hostname {entry['hostname']}" if entry["queue"] else ""
        print(f"  {name:<14} pid {entry['pid']:<8} {extra}")
    print(f"  pool gpu: {state.get('pool_slots', state['gpu_workers'])} slots "
          f"({state.get('tasks_per_gpu', 1)} task(s) per GPU); logs in {home / 'logs'}; "
          "stop with `make cluster-stop`\n")


def sessions_of(state: dict) -> set[int]:
    return {entry["pid"] for entry in state.get("components", {}).values()}


def stop_cluster(home: Path, grace_s: float) -> tuple[int, list]:
    """End every process of the cluster's components; return how many there were and the
    ones still running after SIGKILL (none, normally)."""
    state = load_state(home)
    sessions = sessions_of(state)
    procs = processes_in_sessions(sessions)
    if procs:
        kill(procs, grace_s)
    if state:
        state["components"] = {}
        save_state(home, state)
    return len(procs), processes_in_sessions(sessions)


def stop(opts: argparse.Namespace) -> int:
    home = Path(opts.home).resolve()
    n, left = stop_cluster(home, opts.grace)
    print(f"stopped {n} process(es) of the cluster in {home}" if n else f"no cluster running from {home}")
    if left:
        print(f"still running: {[p.pid for p in left]}", file=sys.stderr)
        return 1
    return 0


def status(opts: argparse.Namespace) -> int:
    home = Path(opts.home).resolve()
    state = load_state(home)
    if not state.get("components"):
        print(f"no cluster started from {home}")
        return 1
    up = 0
    for name, entry in state["components"].items():
        running = process_of(entry) is not None
        up += running
        print(f"{name:<14} pid {entry['pid']:<8} {'running' if running else 'NOT RUNNING'}")
    print(f"API: {state['url']}")
    return 0 if up == len(state["components"]) else 1


def trigger(opts: argparse.Namespace) -> int:
    home = Path(opts.home).resolve()
    state = load_state(home)
    api = Api(state["url"], secrets_of(home)["admin_password"])
    run_id = api.trigger(json.loads(opts.conf))
    print(f"triggered {run_id}")
    if opts.wait:
        run = api.wait(run_id, opts.timeout)
        print(run_table(api, run_id))
        return 0 if run["state"] == "success" else 1
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--home", default=os.environ.get("LORAFLOW_CLUSTER_HOME", ROOT / "airflow_cluster"),
                        help="AIRFLOW_HOME of the cluster: state, logs, secrets (default airflow_cluster/)")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("start", help="create the database, init, start every component")
    p.add_argument("--gpu-workers", type=int, help="workers on queue gpu (default: GPUs, else 2)")
    p.add_argument("--tasks-per-gpu", help="training tasks per GPU: a number or auto "
                   "(default $LORAFLOW_TASKS_PER_GPU, else 1; 1 without a GPU)")
    p.add_argument("--default-concurrency", type=int, default=4, help="tasks at once on the default worker")
    p.add_argument("--host", default="127.0.0.1", help="address the API server listens on")
    p.add_argument("--port", type=int, default=8380,
                   help="API server port; the triggerer's and workers' log servers use the next ones")
    p.add_argument("--postgres", default="postgresql://postgres@127.0.0.1:5432", help="server URL")
    p.add_argument("--database", default="loraflow_airflow", help="metadata database (created if absent)")
    p.add_argument("--redis", default="redis://127.0.0.1:6379/1", help="broker and result backend")
    p.add_argument("--redis-prefix", default="loraflow:", help="prefix of every Redis key ('' for none)")
    p.add_argument("--artifacts", default=os.environ.get("LORAFLOW_ARTIFACTS", ROOT / "artifacts"))
    p.add_argument("--reports", default=os.environ.get("LORAFLOW_REPORTS", ROOT / "reports"))
    p.add_argument("--timeout", type=float, default=300, help="seconds to wait for each component")
    p.set_defaults(func=start)
    p = sub.add_parser("stop", help="stop every process of the cluster (by PID)")
    p.add_argument("--grace", type=float, default=30, help="seconds between SIGTERM and SIGKILL")
    p.set_defaults(func=stop)
    sub.add_parser("status", help="which components run").set_defaults(func=status)
    p = sub.add_parser("trigger", help="start a DAG run through the REST API")
    p.add_argument("conf", help='trigger conf as JSON, e.g. \'{"preset": "smoke"}\'')
    p.add_argument("--wait", action="store_true", help="wait for the end, print tasks and workers")
    p.add_argument("--timeout", type=float, default=3600)
    p.set_defaults(func=trigger)
    return parser


def main(argv: list[str] | None = None) -> int:
    opts = build_parser().parse_args(argv)
    return opts.func(opts)


if __name__ == "__main__":
    sys.exit(main())
