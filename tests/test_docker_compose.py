"""The distributed deployment (docker/): the compose file and Dockerfile are parsed, not
run, so these tests need no Docker. They pin what breaks a Celery deployment silently:
mismatched secrets, queues nobody serves, storage seen at different paths, redelivered
long tasks, misspelt config keys."""

from __future__ import annotations

import re
from datetime import timedelta
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DOCKER = ROOT / "docker"
EXECUTION_API_URL = "http://airflow-api-server:8080/execution/"

# Options of apache-airflow-providers-celery 3.26.0 (its get_provider_info()) that the
# compose file may set; the provider is not installed in the test environment.
CELERY_PROVIDER_OPTIONS = {
    ("celery", "broker_url"), ("celery", "result_backend"), ("celery", "worker_concurrency"),
    ("celery", "worker_prefetch_multiplier"), ("celery", "task_acks_late"),
    ("celery_broker_transport_options", "visibility_timeout"),
}

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
               AIRFLOW_ADMIN_PASSWORD="admin-password")
    env.update(overrides)
    return env


@pytest.fixture(scope="module")
def services() -> dict[str, dict]:
    raw = yaml.safe_load((DOCKER / "docker-compose.yaml").read_text())
    return interpolate(raw, settings())["services"]


def airflow_services(services: dict[str, dict]) -> dict[str, dict]:
    return {name: s for name, s in services.items() if name.startswith("airflow-")}


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
        env = service["environment"]
        assert env["AIRFLOW__CORE__EXECUTOR"] == "CeleryExecutor", name
        assert env["AIRFLOW__API_AUTH__JWT_SECRET"] == "jwt-secret", name
        assert env["AIRFLOW__API__SECRET_KEY"] == "api-secret", name
        assert env["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == EXECUTION_API_URL, name
    # The URL names the API server service, on the port it listens on.
    api = services["airflow-api-server"]
    assert option(api["command"], "--port") == "8080"
    assert any(p.endswith(":8080") for p in api["ports"])


def test_secrets_have_no_default_in_the_compose_file():
    raw = yaml.safe_load((DOCKER / "docker-compose.yaml").read_text())
    for secret in ("AIRFLOW_JWT_SECRET", "AIRFLOW_API_SECRET_KEY", "AIRFLOW_ADMIN_PASSWORD"):
        with pytest.raises(ValueError, match=secret):
            interpolate(raw, settings(**{secret: ""}))


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
        assert service["environment"]["AIRFLOW__OPERATORS__DEFAULT_QUEUE"] == "default"


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
        env = service["environment"]
        visibility = int(env["AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__VISIBILITY_TIMEOUT"])
        assert visibility > longest.total_seconds(), name


def test_every_airflow_setting_is_a_real_config_option(services):
    import airflow

    config_yml = Path(airflow.__file__).parent / "config_templates" / "config.yml"
    template = yaml.safe_load(config_yml.read_text())
    known = {(section, key) for section, spec in template.items() for key in spec["options"]}
    known |= CELERY_PROVIDER_OPTIONS
    used = {var for s in airflow_services(services).values() for var in s["environment"]
            if var.startswith("AIRFLOW__")}
    for var in used:
        section, key = var.removeprefix("AIRFLOW__").lower().split("__")
        assert (section, key) in known, f"{var} is not an Airflow 3.3 / celery provider option"


def test_init_migrates_creates_gpu_pool_and_starts_first(services):
    script = services["airflow-init"]["command"][0]
    assert "airflow db migrate" in script
    assert re.search(r'airflow pools set gpu "\$\{GPU_POOL_SLOTS\}"', script)
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
    project = next(line for line in installs if re.search(r"-c constraints.txt \. ", line))
    assert "apache-airflow-providers-celery==" in project
    assert "apache-airflow-providers-postgres==" in project
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
