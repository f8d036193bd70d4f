"""`make cluster` and docker/ configure Airflow alike (no processes started here): the same
shared settings, the same per-deployment keys, and workers that can share one host."""

from __future__ import annotations

import os

import loraflow_cluster
import loraflow_hostname
import pytest
import yaml

from tests.cluster.test_celery_cluster import ROOT, cluster_env
from tests.test_docker_compose import environment, interpolate, settings

# Set by one deployment only, on purpose.
COMPOSE_ONLY = {"AIRFLOW__SCHEDULER__ENABLE_HEALTH_CHECK"}  # the containers' health checks
CLUSTER_ONLY = {  # one host, one checkout, one Redis shared with others
    "AIRFLOW__API__BASE_URL", "AIRFLOW__API__WORKERS", "AIRFLOW__CORE__DAGS_FOLDER",
    "AIRFLOW__CORE__HOSTNAME_CALLABLE", "AIRFLOW__LOGGING__TRIGGER_LOG_SERVER_PORT",
    "AIRFLOW__CELERY_BROKER_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX",
    "AIRFLOW__CELERY_RESULT_BACKEND_TRANSPORT_OPTIONS__GLOBAL_KEYPREFIX",
}


@pytest.fixture
def opts(tmp_path, monkeypatch):
    for name in list(os.environ):
        if name.startswith("AIRFLOW__") or name == "OMP_NUM_THREADS":
            monkeypatch.delenv(name)
    return loraflow_cluster.build_parser().parse_args(["--home", str(tmp_path / "home"), "start"])


def test_cluster_sets_the_settings_docker_compose_sets(opts, tmp_path):
    cluster = cluster_env.settings(opts, tmp_path / "home")
    raw = yaml.safe_load((ROOT / "docker" / "docker-compose.yaml").read_text())
    compose = environment(interpolate(raw, settings())["services"]["airflow-scheduler"])
    ours = {k for k in cluster if k.startswith("AIRFLOW__")}
    theirs = {k for k in compose if k.startswith("AIRFLOW__")}
    assert theirs - ours == COMPOSE_ONLY
    assert ours - theirs == CLUSTER_ONLY
    shared = cluster_env.read_env_file(cluster_env.SHARED_SETTINGS)
    assert {k: cluster[k] for k in shared} == {k: compose[k] for k in shared} == shared
    assert cluster["AIRFLOW__CORE__EXECUTION_API_SERVER_URL"] == "http://127.0.0.1:8380/execution/"
    assert cluster["AIRFLOW__CORE__FERNET_KEY_CMD"] == f"cat {tmp_path}/home/auth/fernet.key"
    # Secrets: generated once, then the same on every start.
    assert cluster_env.settings(opts, tmp_path / "home")["AIRFLOW__API_AUTH__JWT_SECRET"] == \
        cluster["AIRFLOW__API_AUTH__JWT_SECRET"]
    assert (tmp_path / "home" / "auth" / "secrets.json").stat().st_mode & 0o077 == 0


@pytest.mark.parametrize("gpus, visible", [(0, ["", ""]), (2, ["0", "1"])])
def test_workers_get_their_own_names_ports_and_gpus(opts, gpus, visible):
    opts.gpu_workers = 2
    workers = [c for c in cluster_env.components(opts, gpus) if c.queue]
    assert [(c.name, c.queue) for c in workers] == [("default", "default"), ("gpu-0", "gpu"),
                                                    ("gpu-1", "gpu")]
    gpu = workers[1:]
    assert [c.args[c.args.index("--concurrency") + 1] for c in gpu] == ["1", "1"]
    assert [c.env["CUDA_VISIBLE_DEVICES"] for c in gpu] == visible
    ports = {c.env["AIRFLOW__LOGGING__WORKER_LOG_SERVER_PORT"] for c in workers}
    assert len(ports) == 3 and not ports & {str(opts.port), str(opts.port + 1)}
    assert len({c.args[c.args.index("--celery-hostname") + 1] for c in workers}) == 3
    if not gpus:  # the CPU cores are shared out between the gpu workers
        assert gpu[0].env["OMP_NUM_THREADS"] == str(max(1, (os.cpu_count() or 1) // 2))


def test_the_hostname_callable_is_a_module_of_its_own(opts, tmp_path):
    """Task processes import the hostname callable: it names the tiny module, not the
    launcher, and that module imports nothing of the launcher."""
    import ast

    callable_path = cluster_env.settings(opts, tmp_path / "home")["AIRFLOW__CORE__HOSTNAME_CALLABLE"]
    module, _, name = callable_path.rpartition(".")
    assert (module, name) == ("loraflow_hostname", "worker_hostname")
    source = (ROOT / "scripts" / f"{module}.py").read_text()
    imported = {alias.name for node in ast.walk(ast.parse(source))
                if isinstance(node, (ast.Import, ast.ImportFrom))
                for alias in node.names} | {node.module for node in ast.walk(ast.parse(source))
                                            if isinstance(node, ast.ImportFrom)}
    assert imported <= {"__future__", "annotations", "os", "socket"}


def test_worker_hostname_names_the_worker(monkeypatch):
    monkeypatch.delenv("LORAFLOW_WORKER_NAME", raising=False)
    host = loraflow_hostname.worker_hostname()
    monkeypatch.setenv("LORAFLOW_WORKER_NAME", "gpu-1")
    assert loraflow_hostname.worker_hostname() == f"gpu-1.{host}"


@pytest.mark.parametrize("gpus, workers, k, concurrency, pool", [
    (0, 2, 3, ["1", "1"], 2),  # no GPU: one task per worker, as before
    (2, 2, 3, ["3", "3"], 6),
    (2, 3, 4, ["4", "4", "1"], 9),  # the third worker has no GPU of its own: the CPU, one task
])
def test_gpu_workers_run_k_tasks_and_the_pool_counts_them(opts, tmp_path, gpus, workers, k,
                                                          concurrency, pool):
    opts.gpu_workers, opts.resolved_tasks_per_gpu = workers, (k if gpus else 1)
    gpu = [c for c in cluster_env.components(opts, gpus) if c.queue == "gpu"]
    assert [c.args[c.args.index("--concurrency") + 1] for c in gpu] == concurrency
    assert cluster_env.pool_slots(opts, gpus) == pool
    # every component (so every task's lease) gets the resolved k
    assert cluster_env.settings(opts, tmp_path / "home")["LORAFLOW_TASKS_PER_GPU"] == str(opts.resolved_tasks_per_gpu)


def test_tasks_per_gpu_flag_wins_and_no_gpu_means_one(opts, monkeypatch):
    from tasks import slots

    monkeypatch.setenv("LORAFLOW_TASKS_PER_GPU", "2")
    monkeypatch.setattr(slots, "nvidia_smi_gpus", lambda: [slots.Gpu(0, 80 << 30, 80 << 30)])
    assert cluster_env.tasks_per_gpu(opts) == 2
    opts.tasks_per_gpu = "5"
    assert cluster_env.tasks_per_gpu(opts) == 5
    monkeypatch.setattr(slots, "nvidia_smi_gpus", lambda: [])
    assert cluster_env.tasks_per_gpu(opts) == 1
    opts.tasks_per_gpu = "lots"
    with pytest.raises(ValueError, match="got 'lots'"):
        cluster_env.tasks_per_gpu(opts)
