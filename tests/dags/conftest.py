"""Airflow for the DAG tests: a throw-away AIRFLOW_HOME, set before airflow is imported
(Airflow reads its home and config once, at import), so no test touches the project's
airflow_home/ or ~/airflow."""

from __future__ import annotations

import atexit
import logging
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest

from tasks.steps import DAG_ID  # noqa: F401  (the tests import it from here)

PROJECT_DIR = Path(__file__).resolve().parents[2]
DAGS_DIR = PROJECT_DIR / "dags"
PLUGINS_DIR = PROJECT_DIR / "plugins"

_HOME = Path(tempfile.mkdtemp(prefix="loraflow-airflow-home-"))
atexit.register(shutil.rmtree, _HOME, ignore_errors=True)
os.environ["AIRFLOW_HOME"] = str(_HOME)
os.environ["AIRFLOW__CORE__DAGS_FOLDER"] = str(DAGS_DIR)
os.environ["AIRFLOW__CORE__PLUGINS_FOLDER"] = str(PLUGINS_DIR)
os.environ["AIRFLOW__CORE__LOAD_EXAMPLES"] = "False"
os.environ.pop("AIRFLOW__DATABASE__SQL_ALCHEMY_CONN", None)  # SQLite in _HOME
os.environ.pop("LORAFLOW_SCHEDULE", None)  # the tests parse the DAG with its default schedule


def airflow_env(**extra: str) -> dict[str, str]:
    """Environment for Airflow subprocesses: the project importable as `tasks` even
    without `pip install -e .`, plus `extra`."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(PROJECT_DIR), env.get("PYTHONPATH")]))
    env.update(extra)
    return env


_ROOT_HANDLERS = set(logging.getLogger().handlers)
_ROOT_LEVEL = logging.getLogger().level


@pytest.fixture(autouse=True)
def _undo_airflow_logging():
    """Importing or running Airflow adds a stdout handler to the root logger and lowers its
    level to INFO; undo that after each test so the other test packages, which run in the
    same process afterwards, see the logging set-up they expect (pytest's own handlers stay)."""
    yield
    root = logging.getLogger()
    for handler in list(root.handlers):
        if handler not in _ROOT_HANDLERS and not type(handler).__module__.startswith("_pytest"):
            root.removeHandler(handler)
    root.setLevel(_ROOT_LEVEL)


@pytest.fixture(scope="session")
def dag():
    """The DAG as Airflow's own DagBag parses it from dags/."""
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(DAGS_DIR))
    assert bag.import_errors == {}, bag.import_errors
    return bag.dags[DAG_ID]


def migrate_home() -> Path:
    """Migrate the metadata database (SQLite) in the throw-away home and add the `gpu` pool;
    keep a copy of it as it is then (`pristine.db`) for a real Airflow to start from. The
    session fixture `airflow_db` (tests/conftest.py) calls it once."""
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], env=airflow_env(),
                   check=True, capture_output=True, timeout=300)
    subprocess.run([sys.executable, "-m", "airflow", "pools", "set", "gpu", "1", "test"],
                   env=airflow_env(), check=True, capture_output=True, timeout=120)
    shutil.copyfile(_HOME / "airflow.db", _HOME / "pristine.db")
    return _HOME
