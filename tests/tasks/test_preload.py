"""Workers import the ML stack once, before they fork task processes (tasks/preload.py):
Celery workers and the LocalExecutor; the scheduler that reads the Celery settings does not."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from tasks import preload

ROOT = Path(__file__).resolve().parents[2]


def _run(code: str) -> dict:
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True,
                          text=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


def test_the_deployments_point_airflow_at_these_settings(monkeypatch):
    from airflow.configuration import conf
    from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG

    key = "AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS="
    [option] = [line.removeprefix(key) for line in
                (ROOT / "docker" / "airflow.env").read_text().splitlines() if line.startswith(key)]
    monkeypatch.setenv("AIRFLOW__CELERY__CELERY_CONFIG_OPTIONS", option)
    assert conf.getimport("celery", "celery_config_options") is DEFAULT_CELERY_CONFIG


@pytest.mark.slow  # imports the whole stack in a fresh process
def test_only_a_starting_celery_worker_imports_the_stack_and_its_forks_inherit_it():
    seen = _run("""
import json, os, sys
from tasks import preload  # what the scheduler and the worker both import
before = [m for m in preload.PRELOAD if m in sys.modules]
from celery.signals import celeryd_init
celeryd_init.send(sender="gpu-0@host", instance=None, conf=None, options={})
after = [m for m in preload.PRELOAD if m in sys.modules]
read, write = os.pipe()
if os.fork() == 0:  # a task process: the modules are there, nothing to import
    os.write(write, json.dumps(sorted(m for m in preload.PRELOAD if m in sys.modules)).encode())
    os._exit(0)
os.wait()
print(json.dumps({"before": before, "after": after, "child": json.loads(os.read(read, 1 << 16))}))
""")
    assert "torch" not in seen["before"] and "tasks.train" not in seen["before"]
    assert seen["after"] == list(preload.PRELOAD)
    assert seen["child"] == sorted(preload.PRELOAD)


@pytest.mark.slow  # imports the whole stack in a fresh process
def test_the_local_executor_imports_the_stack_before_it_forks_its_workers():
    seen = _run("""
import json, sys
from tasks.preload import PRELOAD, LocalExecutor
executor = LocalExecutor(parallelism=1)
before = [m for m in PRELOAD if m in sys.modules]
executor.start()
after = [m for m in PRELOAD if m in sys.modules]
workers = len(executor.workers)
executor.end()
print(json.dumps({"before": before, "after": after, "workers": workers}))
""")
    assert "torch" not in seen["before"]
    assert seen["after"] == list(preload.PRELOAD) and seen["workers"] == 1


def test_a_module_that_cannot_be_imported_is_reported_not_raised():
    failed = preload.preload(("json", "no_such_module_for_loraflow"))
    assert list(failed) == ["no_such_module_for_loraflow"]
    assert "ModuleNotFoundError" in failed["no_such_module_for_loraflow"]


def test_airflow_takes_it_for_a_local_executor():
    """`airflow standalone` keeps a local executor, and the simple auth manager warns about
    a production-shaped deployment for anything else."""
    from airflow.api_fastapi.auth.managers.simple.simple_auth_manager import SimpleAuthManager
    assert preload.LocalExecutor.is_local  # what `airflow standalone` checks
    assert not SimpleAuthManager._looks_like_production(
        sql_conn="sqlite:////tmp/airflow.db", api_host="127.0.0.1",
        executor="tasks.preload.LocalExecutor")
