"""The distributed deployment (docker/): the compose file and Dockerfile are parsed, not
run, so these tests need no Docker daemon (`docker compose config` checks the file too where
the CLI has Compose). They pin what breaks a Celery deployment silently: mismatched
secrets, queues nobody serves, storage seen at different paths, redelivered long tasks,
misspelt config keys; and what leaks credentials: default passwords, a password on a
command line, connections stored unencrypted."""

from __future__ import annotations

import json
import os
import re
import shutil
import stat
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
EXECUTION_API_URL = "http://airflow-api-server:8080/execution/"

def celery_provider_options() -> set[tuple[str, str]]:
    """The options the installed celery provider declares, as (section, key)."""
    from airflow.providers.celery.get_provider_info import get_provider_info

    return {(section, key) for section, spec in get_provider_info()["config"].items()
            for key in spec["options"]}


_VAR = re.compile(r"\$\{(\w+)(?:(:?[-?])([^}]*))?\}")


def read_env_file(path: Path) -> dict[str, str]:
    pairs = (line.split("=", 1) for line in path.read_text().splitlines()
             if line.strip() and not line.lstrip().startswith("#"))
    return {key.strip(): value.strip() for key, value in pairs}


def interpolate(value, env: dict[str, str]):
    """Compose's variable substitution (${VAR}, ${VAR:-default}, ${VAR:?error}, $$)."""
    if isinstance(value, dict):
        return {k: interpolate(v, env) for k, v in value.items()}
    if isinstance(value, list):
        return [interpolate(v, env) for v in value]
    if not isinstance(value, str):
        return value

    def substitute(match: re.Match) -> str:
        name, op, arg = match.groups()
        current = env.get(name)
        unset = current is None or (current == "" and op and op.startswith(":"))
        if op and op.endswith("?") and unset:
            raise ValueError(f"{name}: {arg}")
        if op and op.endswith("-") and unset:
            return arg
        return current or ""

    return _VAR.sub(substitute, value.replace("$$", "\0")).replace("\0", "$")


def settings(**overrides: str) -> dict[str, str]:
    """docker/.env.example with the required secrets filled in."""
    env = read_env_file(DOCKER / ".env.example")
    env.update(AIRFLOW_JWT_SECRET="jwt-secret", AIRFLOW_API_SECRET_KEY="api-secret",
               AIRFLOW_ADMIN_PASSWORD="admin-password", POSTGRES_PASSWORD="postgres-password",
               REDIS_PASSWORD="redis-password")
    env.update(overrides)
    return env


# Every secret the deployment needs; none may have a default.
SECRETS = ("AIRFLOW_JWT_SECRET", "AIRFLOW_API_SECRET_KEY", "AIRFLOW_ADMIN_PASSWORD",
           "POSTGRES_PASSWORD", "REDIS_PASSWORD")


@pytest.fixture(scope="module")
def services() -> dict[str, dict]:
    raw = yaml.safe_load((DOCKER / "docker-compose.yaml").read_text())
    return interpolate(raw, settings())["services"]


def airflow_services(services: dict[str, dict]) -> dict[str, dict]:
    return {name: s for name, s in services.items() if name.startswith("airflow-")}


def environment(service: dict) -> dict[str, str]:
    """A container's environment as Compose builds it: env_file entries (relative to
    docker/), overridden by `environment`."""
    files = service.get("env_file", [])
    env = {}
    for name in [files] if isinstance(files, str) else files:
        env.update(read_env_file(DOCKER / name))
    env.update(service.get("environment", {}))
    return env


def workers(services: dict[str, dict]) -> dict[str, dict]:
    return {name: s for name, s in services.items()
            if s.get("command", [])[:3] == ["airflow", "celery", "worker"]}


def option(command: list[str], flag: str) -> str:
    return command[command.index(flag) + 1]


def mounts(service: dict) -> dict[str, str]:
    """target path -> source, from short-syntax volume entries."""
    out = {}
    for entry in service.get("volumes", []):
        source, target = entry.split(":")[:2]
        out[target] = source
    return out


def test_every_airflow_service_shares_executor_secrets_and_execution_api_url(services):
    components = airflow_services(services)
    assert {"airflow-init", "airflow-api-server", "airflow-scheduler", "airflow-dag-processor",
            "airflow-triggerer", "airflow-worker", "airflow-gpu-worker"} <= set(components)
    for name, service in components.items():
        env = environment(service)
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__API_AUTH__JWT_SECRET"] == "jwt-secret", name
        assert env["AIRFLOW__API__SECRET_KEY"] == "api-secret", name
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == EXECUTION_API_URL, name
    # The URL names the API server service, on the port it listens on.
    api = services["airflow-api-server"]
    assert option(api["command"], "--port") == "8080"
    assert any(p.endswith(":8080") for p in api["ports"])


def test_airflow_settings_shared_with_make_cluster_come_from_one_file(services):
    shared = read_env_file(DOCKER / "airflow.env")
    assert shared["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"
    assert all(re.fullmatch(r"[\w.:/-]+", v) for v in shared.values())  # read alike by both
    for name, service in airflow_services(services).items():
        assert service["env_file"] == "airflow.env", name
        assert not set(shared) & set(service["environment"]), f"{name} overrides airflow.env"


def test_no_password_or_secret_has_a_default():
    raw = yaml.safe_load((DOCKER / "docker-compose.yaml").read_text())
    for secret in SECRETS:
        with pytest.raises(ValueError, match=secret):
            interpolate(raw, settings(**{secret: ""}))
    text = (DOCKER / "docker-compose.yaml").read_text()
    defaults = re.findall(r"\$\{(\w*(?:PASSWORD|SECRET)\w*):?-", text)
    assert defaults == [], f"defaults for {defaults}"
    example = read_env_file(DOCKER / ".env.example")
    assert {name: example[name] for name in SECRETS} == dict.fromkeys(SECRETS, "")


def test_redis_password_is_on_no_command_line_and_in_no_environment_of_redis(services):
    password = settings()["REDIS_PASSWORD"]
    for name, service in services.items():
        for field in ("command", "entrypoint", "healthcheck"):
            assert password not in json.dumps(service.get(field, "")), f"{name}: {field}"
    redis = services["redis"]
    assert password not in json.dumps(redis.get("environment", {}))
    # It comes in as a secret file, read by redis-server from a config file.
    assert redis["secrets"] == ["redis_password"]
    raw = yaml.safe_load((DOCKER / "docker-compose.yaml").read_text())
    assert raw["secrets"]["redis_password"] == {"environment": "REDIS_PASSWORD"}
    script = redis["entrypoint"][-1]
    assert "/run/secrets/redis_password" in script
    assert re.search(r"exec docker-entrypoint.sh redis-server /tmp/redis.conf$", script.strip())
    assert "/run/secrets/redis_password" in redis["healthcheck"]["test"][1]
    # ...and the broker URL the workers use carries the same password.
    for service in airflow_services(services).values():
        assert f":{password}@" in service["environment"]["AIRFLOW__CELERY__BROKER_URL"]


def test_redis_config_from_the_secret_needs_the_password(tmp_path):
    """The redis service's script with this machine's redis-server: the password works,
    none is no good, and redis-server's command line does not show it."""
    if not shutil.which("redis-server"):
        pytest.skip("redis-server is not installed")
    import socket

    import psutil
    import redis
    import redis.backoff
    import redis.retry

    raw = yaml.safe_load((DOCKER / "docker-compose.yaml").read_text())
    script = interpolate(raw, settings())["services"]["redis"]["entrypoint"][-1]
    secret, conf = tmp_path / "redis_password", tmp_path / "redis.conf"
    secret.write_text("s3cret-Password")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = (script.replace("/run/secrets/redis_password", str(secret))
              .replace("/tmp/redis.conf", str(conf))
              .replace("chown redis", "true")  # no `redis` user needed here
              .replace("docker-entrypoint.sh redis-server", "redis-server")).rstrip()
    script += f" --port {port} --bind 127.0.0.1 --save '' --dir {tmp_path}"
    proc = subprocess.Popen(["sh", "-c", script], stdout=subprocess.DEVNULL)
    try:
        # Wait for the port with a bare socket: redis-py's own retries back off for seconds.
        for _ in range(100):
            assert proc.poll() is None, "redis-server exited"
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)
        client = redis.Redis(port=port, password="s3cret-Password")
        assert client.ping()
        no_retries = redis.retry.Retry(redis.backoff.NoBackoff(), 0)  # refused is final
        with pytest.raises(redis.AuthenticationError):
            redis.Redis(port=port, retry=no_retries).ping()
        assert "s3cret-Password" not in " ".join(psutil.Process(proc.pid).cmdline())
        assert stat.S_IMODE(conf.stat().st_mode) == 0o600
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_fernet_key_is_generated_once_at_init_and_read_by_every_component(services, tmp_path):
    auth = "/opt/airflow/auth"
    init = services["airflow-init"]
    assert init["environment"]["LORAFLOW_AUTH_DIR"] == auth
    assert init["environment"]["AIRFLOW_FERNET_KEY"] == ""  # from .env.example: generate one
    for name, service in airflow_services(services).items():
        env = environment(service)
        assert "AIRFLOW__CORE__FERNET_KEY" not in env, name  # an empty key stores plain text
        assert env["AIRFLOW__CORE__FERNET_KEY_CMD"] == f"cat {auth}/fernet.key", name
        assert mounts(service)[auth].startswith(settings()["LORAFLOW_STORAGE"] + "/"), name

    from cryptography.fernet import Fernet

    first = run_init_script(tmp_path)
    key = (tmp_path / "auth" / "fernet.key").read_text().strip()
    Fernet(key)  # a valid key
    assert stat.S_IMODE((tmp_path / "auth" / "fernet.key").stat().st_mode) == 0o600
    assert "generated a Fernet key" in first.stdout
    run_init_script(tmp_path)
    assert (tmp_path / "auth" / "fernet.key").read_text().strip() == key  # kept
    own = Fernet.generate_key().decode()
    run_init_script(tmp_path, AIRFLOW_FERNET_KEY=own)
    assert (tmp_path / "auth" / "fernet.key").read_text().strip() == own
    with pytest.raises(subprocess.CalledProcessError):
        run_init_script(tmp_path, AIRFLOW_FERNET_KEY="not-a-key")


def run_init_script(tmp_path: Path, **env: str) -> subprocess.CompletedProcess:
    """docker/airflow-init.sh with a stand-in `airflow` that records its arguments."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(exist_ok=True)
    fake = bin_dir / "airflow"
    fake.write_text(f'#!/bin/sh\necho "$*" >> {tmp_path}/airflow-calls\n')
    fake.chmod(0o755)
    (bin_dir / "python").unlink(missing_ok=True)
    (bin_dir / "python").symlink_to(sys.executable)
    full = {**os.environ, "PATH": f"{bin_dir}:{os.environ['PATH']}",
            "LORAFLOW_AUTH_DIR": str(tmp_path / "auth"), "AIRFLOW_ADMIN_USER": "admin",
            "AIRFLOW_ADMIN_PASSWORD": "pw", "GPU_POOL_SLOTS": "3", "AIRFLOW_FERNET_KEY": "",
            "LORAFLOW_TASKS_PER_GPU": "1", **env}
    return subprocess.run(["bash", str(DOCKER / "airflow-init.sh")], env=full, check=True,
                          capture_output=True, text=True, timeout=60)


def has_docker_compose() -> bool:
    return bool(shutil.which("docker")) and subprocess.run(
        ["docker", "compose", "version"], capture_output=True, check=False).returncode == 0


@pytest.mark.skipif(not has_docker_compose(), reason="needs the docker CLI with Compose v2")
def test_docker_compose_config_accepts_the_file(tmp_path):
    env_file = tmp_path / ".env"
    env_file.write_text("".join(f"{k}={v}\n" for k, v in settings().items()))
    done = subprocess.run(["docker", "compose", "--env-file", str(env_file), "-f",
                           str(DOCKER / "docker-compose.yaml"), "config", "--format", "json"],
                          capture_output=True, text=True, timeout=120, check=False)
    assert done.returncode == 0, done.stderr
    config = json.loads(done.stdout)
    redis = config["services"]["redis"]
    assert settings()["REDIS_PASSWORD"] not in json.dumps(
        [redis.get("command"), redis.get("entrypoint"), redis.get("environment")])
    assert environment(config["services"]["airflow-worker"])["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor"


def test_gpu_worker_serves_queue_gpu_one_task_at_a_time_on_a_reserved_gpu(services):
    gpu = services["airflow-gpu-worker"]
    assert option(gpu["command"], "--queues") == "gpu"
    assert option(gpu["command"], "--concurrency") == "1"
    devices = gpu["deploy"]["resources"]["reservations"]["devices"]
    assert any(d["driver"] == "nvidia" and "gpu" in d["capabilities"] for d in devices)
    assert gpu["image"].endswith(":gpu") and gpu["build"]["args"]["TORCH_INDEX"]
    assert str(gpu["deploy"]["replicas"]) == settings()["GPU_WORKERS"]


def test_default_queue_has_a_worker_and_only_the_gpu_worker_serves_gpu(services):
    queues = {name: option(s["command"], "--queues").split(",")
              for name, s in workers(services).items()}
    assert queues["airflow-worker"] == ["default"]
    assert [name for name, q in queues.items() if "gpu" in q] == ["airflow-gpu-worker"]
    for service in airflow_services(services).values():
        assert environment(service)["AIRFLOW__OPERATORS__DEFAULT_QUEUE"] == "default"


def test_workers_see_shared_artifacts_and_reports_at_the_paths_tasks_use(services):
    for variable in ("LORAFLOW_ARTIFACTS", "LORAFLOW_REPORTS"):
        sources = set()
        for name, service in airflow_services(services).items():
            path = service["environment"][variable]
            assert path in mounts(service), f"{name} does not mount {path}"
            sources.add(mounts(service)[path])
        assert len(sources) == 1, f"{variable} comes from different folders: {sources}"
        # On the shared storage folder (an NFS mount on a pool), not a host-local volume.
        assert sources.pop().startswith(settings()["LORAFLOW_STORAGE"] + "/"), variable


def test_the_mounted_data_is_the_only_local_source_the_trigger_form_may_name(services,
                                                                              monkeypatch):
    from tasks.sources import data_roots

    for name, service in airflow_services(services).items():
        env = environment(service)
        monkeypatch.setenv("LORAFLOW_DATA_ROOTS", env["LORAFLOW_DATA_ROOTS"])
        assert [str(root) for root in data_roots()] == [env["LORAFLOW_DATA"]], name
        assert mounts(service)[env["LORAFLOW_DATA"]] == settings()["LORAFLOW_DATA_DIR"], name
        assert "LORAFLOW_PRIVATE_URLS" not in env, name  # https to public addresses only


def test_gpu_locks_are_host_local_and_where_tasks_gpu_looks(services, monkeypatch):
    from tasks.gpu import lock_dir

    for name, service in workers(services).items():
        artifacts = service["environment"]["LORAFLOW_ARTIFACTS"]
        monkeypatch.setenv("LORAFLOW_ARTIFACTS", artifacts)
        source = mounts(service).get(str(lock_dir()))
        assert source == "gpu-locks", f"{name}: {lock_dir()} is not the host-local volume"
    raw = yaml.safe_load((DOCKER / "docker-compose.yaml").read_text())
    assert "gpu-locks" in raw["volumes"]


def longest_execution_timeout(dag_file: Path) -> timedelta:
    """The largest `execution_timeout=timedelta(...)` (or "execution_timeout": ...) in a
    DAG file, read as text so the test does not need the DAG to import."""
    pattern = r"execution_timeout[\"']?\s*[=:]\s*timedelta\(([^)]*)\)"
    found = re.findall(pattern, dag_file.read_text())
    assert found, f"no execution_timeout in {dag_file}"
    return max(timedelta(**{k: float(v) for k, v in re.findall(r"(\w+)\s*=\s*([\d.]+)", args)})
               for args in found)


def test_visibility_timeout_outlasts_the_longest_task(services):
    longest = longest_execution_timeout(ROOT / "dags" / "lora_imdb_experiment.py")
    assert longest >= timedelta(hours=1)  # the training tasks' timeout, not a 5-minute one
    for name, service in workers(services).items():
        env = environment(service)
        visibility = int(env["AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT"])
        assert visibility > longest.total_seconds(), name


def test_every_airflow_setting_is_a_real_config_option(services):
    import airflow

    config_yml = Path(airflow.__file__).parent / "config_templates" / "config.yml"
    template = yaml.safe_load(config_yml.read_text())
    known = {(section, key) for section, spec in template.items() for key in spec["options"]}
    known |= celery_provider_options()
    used = {var for s in airflow_services(services).values() for var in environment(s)
            if var.startswith("AIRFLOW__")}
    for var in used:
        section, key = var.removeprefix("AIRFLOW__").lower().split("__")
        key = key.removesuffix("_cmd")  # [section] key from a command's output
        assert (section, key) in known, f"{var} is not an Airflow 3.3 / celery provider option"


def test_init_migrates_creates_gpu_pool_and_starts_first(services, tmp_path):
    assert "bash /opt/loraflow/airflow-init.sh" in services["airflow-init"]["command"][0]
    assert "COPY docker/airflow-init.sh /opt/loraflow/airflow-init.sh" in dockerfile_instructions()
    run_init_script(tmp_path)
    calls = (tmp_path / "airflow-calls").read_text().splitlines()
    assert calls[0] == "db migrate" and calls[1].startswith("pools set gpu 3 ")
    assert json.loads((tmp_path / "auth" / "passwords.json").read_text()) == {"admin": "pw"}
    assert services["airflow-init"]["environment"]["GPU_POOL_SLOTS"] == settings()["GPU_POOL_SLOTS"]
    for name, service in airflow_services(services).items():
        if name != "airflow-init":
            condition = service["depends_on"]["airflow-init"]["condition"]
            assert condition == "service_completed_successfully", name
    long_running = set(services) - {"airflow-init"}
    assert all("healthcheck" in services[name] for name in long_running)


def dockerfile_instructions() -> list[str]:
    text = (DOCKER / "Dockerfile").read_text().replace("\\\n", " ")
    return [line.strip() for line in text.splitlines() if line.strip() and not line.startswith("#")]


def test_dockerfile_installs_the_project_with_constraints_and_a_selectable_torch():
    lines = dockerfile_instructions()
    assert lines[0] == "FROM python:3.11-slim"
    installs = [line for line in lines if "pip install" in line]
    torch_install = next(line for line in installs if re.search(r"\btorch$", line))
    assert "-c constraints.txt" in torch_install and '--index-url "${TORCH_INDEX}"' in torch_install
    project = next(line for line in installs if "-c constraints.txt \".[celery]\"" in line)
    assert "import torch, tasks.pipeline, lora_core, airflow.providers.celery, psycopg2" in project
    pins = (ROOT / "constraints.txt").read_text().splitlines()
    for provider in ("apache-airflow-providers-celery", "apache-airflow-providers-postgres"):
        assert any(pin.startswith(f"{provider}==") for pin in pins), provider
    assert any(line.startswith("ARG TORCH_INDEX=") for line in lines)


def test_dockerignore_keeps_the_context_small_but_lets_every_copy_through():
    rules = [r for r in (DOCKER / "Dockerfile.dockerignore").read_text().splitlines()
             if r and not r.startswith("#")]
    assert rules[0] == "*"  # .venv, artifacts, airflow_home stay out
    allowed = {r[1:].rstrip("/") for r in rules if r.startswith("!")}
    for line in dockerfile_instructions():
        if line.startswith("COPY"):
            sources = [w for w in line.split()[1:-1] if not w.startswith("--")]
            assert set(sources) <= allowed, line
            assert all((ROOT / s).exists() for s in sources), line


def test_tasks_per_gpu_sets_gpu_worker_concurrency_lease_and_pool(tmp_path):
    services = interpolate(yaml.safe_load((DOCKER / "docker-compose.yaml").read_text()),
                           settings(LORAFLOW_TASKS_PER_GPU="4"))["services"]
    gpu = services["airflow-gpu-worker"]
    assert option(gpu["command"], "--concurrency") == "4"
    for name, service in airflow_services(services).items():  # every task's lease sees k
        assert environment(service)["LORAFLOW_TASKS_PER_GPU"] == "4", name
    run_init_script(tmp_path, GPU_POOL_SLOTS="3", LORAFLOW_TASKS_PER_GPU="4")
    calls = (tmp_path / "airflow-calls").read_text().splitlines()
    assert calls[1].startswith("pools set gpu 12 ")  # 3 GPUs x 4 tasks each


def test_init_refuses_auto_where_no_gpu_can_be_measured(tmp_path):
    with pytest.raises(subprocess.CalledProcessError) as failed:
        run_init_script(tmp_path, LORAFLOW_TASKS_PER_GPU="auto")
    assert "LORAFLOW_TASKS_PER_GPU must be a whole number >= 1 here" in failed.value.stderr
    assert not (tmp_path / "airflow-calls").exists()
