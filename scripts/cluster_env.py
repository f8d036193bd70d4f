"""The environment of a `make cluster` deployment: its components (control plane and
Celery workers), the settings every component starts with (docker/airflow.env shared with
docker compose, then this deployment's addresses, secrets and paths), its secrets and its
PostgreSQL database."""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHARED_SETTINGS = ROOT / "docker" / "airflow.env"
ADMIN = "admin"
HOSTNAME_CALLABLE = "loraflow_hostname.worker_hostname"  # scripts/loraflow_hostname.py


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines; `#` comments and blank lines skipped (docker/airflow.env)."""
    pairs = (
        line.split("=", 1)
        for line in path.read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    )
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
    from tasks import slots  # standard library only

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
        control.append(
            Component(
                name,
                [
                    "celery",
                    "worker",
                    "--queues",
                    queue,
                    "--concurrency",
                    str(concurrency),
                    "--celery-hostname",
                    f"{name}@%h",
                ],
                env={
                    **env,
                    "LORAFLOW_WORKER_NAME": name,
                    "AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT": str(port + offset),
                },
                queue=queue,
            )
        )
    return control


def secrets_of(home: Path) -> dict[str, str]:
    """This deployment's secrets, generated on the first start and kept in <home>/auth."""
    path = home / "auth" / "secrets.json"
    if path.exists():
        return json.loads(path.read_text())
    values = {
        name: secrets.token_urlsafe(32)
        for name in ("jwt_secret", "api_secret_key", "admin_password")
    }
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
        for section in (
            "CELERY_BROKER_TRANSPORT_OPTIONS",
            "CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS",
        ):
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
        "AIRFLOW__CORE__HOSTNAME_CALLABLE": HOSTNAME_CALLABLE,
        "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT": str(opts.port + 1),
        "LORAFLOW_ARTIFACTS": str(Path(opts.artifacts).resolve()),
        "LORAFLOW_REPORTS": str(Path(opts.reports).resolve()),
        # runs start when the data asset receives an event (or from the trigger form)
        "LORAFLOW_SCHEDULE": os.environ.get("LORAFLOW_SCHEDULE", "asset"),
        # the lease in every task admits as many tasks per GPU as the pool and workers do
        "LORAFLOW_TASKS_PER_GPU": str(getattr(opts, "resolved_tasks_per_gpu", None) or 1),
        # The project importable as `tasks` (as in scripts/airflow_env.sh), scripts/ for
        # the hostname callable (`loraflow_hostname`), and the venv's `airflow` and `python`.
        "PYTHONPATH": os.pathsep.join(
            filter(None, [str(ROOT), str(ROOT / "scripts"), os.environ.get("PYTHONPATH")])
        ),
        "PATH": os.pathsep.join([venv_bin, os.environ.get("PATH", "")]),
    }


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
