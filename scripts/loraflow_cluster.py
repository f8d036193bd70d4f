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
through [core] hostname_callable = loraflow_hostname.worker_hostname, its own name in the
task instances it runs (`gpu-0.<host>`): the REST API shows which worker ran what.
Each component runs in a session of its own, which its task processes (in process groups
of their own) stay in: `stop` ends every process of those sessions, by PID.

This file is the command; its parts are scripts/cluster_env.py (components, settings,
secrets, database), scripts/cluster_processes.py (state, supervision, the stop sweep),
scripts/cluster_api.py (the REST client) and scripts/loraflow_hostname.py.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

from cluster_api import Api, run_table
from cluster_env import (
    ADMIN,
    ROOT,
    Component,
    components,
    create_database,
    gpu_count,
    pool_slots,
    secrets_of,
    settings,
    tasks_per_gpu,
)
from cluster_processes import (
    load_state,
    process_of,
    processes_in_sessions,
    save_state,
    stop_cluster,
    tail,
    wait_for,
)

from tasks.steps import DAG_ID

INIT_SCRIPT = ROOT / "docker" / "airflow-init.sh"


def start(opts: argparse.Namespace) -> int:
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

    state = {"opts": {k: v for k, v in vars(opts).items() if k != "func"},  # for `restart`
             "home": str(home), "url": f"http://{opts.host}:{opts.port}", "database": opts.database,
             "redis": opts.redis, "gpu_workers": opts.gpu_workers, "gpus": gpus,
             "tasks_per_gpu": opts.resolved_tasks_per_gpu, "pool_slots": pool_slots(opts, gpus),
             "artifacts": env["LORAFLOW_ARTIFACTS"], "reports": env["LORAFLOW_REPORTS"],
             "components": {}}
    for c in plan:
        state["components"][c.name] = launch(c, env, home)
        save_state(home, state)

    try:
        wait_until_ready(state, home, opts.timeout)
    except (TimeoutError, RuntimeError) as e:
        print(f"error: {e}; stopping the cluster", file=sys.stderr)
        stop_cluster(home, grace_s=10)
        return 1
    print_summary(state, home)
    return 0


def launch(c: Component, env: dict[str, str], home: Path) -> dict:
    """Start one component in a session of its own; its state entry."""
    import psutil

    out = home / "logs" / f"{c.name}.out"
    with open(out, "ab") as log:
        proc = subprocess.Popen([str(Path(sys.executable).parent / "airflow"), *c.args],
                                env={**env, **c.env}, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL, start_new_session=True, cwd=home)
    return {"pid": proc.pid, "started": psutil.Process(proc.pid).create_time(), "log": str(out),
            "queue": c.queue, "hostname": worker_hostname_of(c),
            "cuda_visible_devices": c.env.get("CUDA_VISIBLE_DEVICES")}


def restart(opts: argparse.Namespace) -> int:
    """Start one component again, as `start` started it (after a crash, or --kill first:
    SIGKILL every process of its session, as a lost machine dies); wait until it is back."""
    home = Path(opts.home).resolve()
    state = load_state(home)
    if "opts" not in state:
        print(f"no cluster started from {home}", file=sys.stderr)
        return 1
    started = argparse.Namespace(**state["opts"])
    plan = {c.name: c for c in components(started, state["gpus"])}
    if opts.component not in plan:
        print(f"unknown component {opts.component!r}; one of {sorted(plan)}", file=sys.stderr)
        return 2
    entry = state["components"].get(opts.component)
    if entry and process_of(entry):
        if not opts.kill:
            print(f"{opts.component} is running (pid {entry['pid']}); --kill ends it first",
                  file=sys.stderr)
            return 1
        kill_session(entry["pid"])
    log = home / "logs" / f"{opts.component}.out"
    offset = log.stat().st_size if log.exists() else 0
    state["components"][opts.component] = launch(plan[opts.component], settings(started, home), home)
    save_state(home, state)
    try:
        wait_until_back(state, opts.component, log, offset, opts.timeout)
    except (TimeoutError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"restarted {opts.component}: pid {state['components'][opts.component]['pid']}")
    return 0


def kill_session(pid: int) -> None:
    """SIGKILL every process of the session that `pid` leads: the component, its pool
    processes, log server and task processes."""
    import psutil

    procs = processes_in_sessions({pid})
    for proc in procs:
        try:
            proc.kill()
        except psutil.Error:
            pass
    psutil.wait_procs(procs, timeout=10)


def wait_until_back(state: dict, name: str, log: Path, offset: int, timeout: float) -> None:
    """A worker: `ready.` in its log since `offset`; the API server: it answers; the
    scheduler, triggerer, DAG processor: the health endpoint says healthy."""
    import httpx

    entry = state["components"][name]

    def up():
        if not process_of(entry):
            raise RuntimeError(f"airflow {name} exited:\n{tail(log)}")
        if entry["queue"]:
            with open(log, "rb") as f:
                f.seek(offset)
                return b" ready." in f.read()
        try:
            health = httpx.get(f"{state['url']}/api/v2/monitor/health", timeout=5).json()
        except (httpx.HTTPError, ValueError):
            return False
        job = name.replace("-", "_")
        return name == "api-server" or health.get(job, {}).get("status") == "healthy"

    wait_for(f"{name} to be back", up, timeout)


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
    p = sub.add_parser("restart", help="start one component again (after a crash, or --kill)")
    p.add_argument("component", help="api-server, scheduler, dag-processor, triggerer, "
                   "default, gpu-<i>")
    p.add_argument("--kill", action="store_true", help="SIGKILL it first if it runs")
    p.add_argument("--timeout", type=float, default=120, help="seconds to wait until it is back")
    p.set_defaults(func=restart)
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
