"""Shared fixtures: the real IMDB sample, small configs, isolated run folders, one data and
tokenization cache per session and one smoke run of every method per session."""

from __future__ import annotations

import os

# Tests never reach the hub, even under `make`, which exports HF_HUB_OFFLINE=0 for users:
# online, every lookup of a model that is not there waited on its retries (23 s a test).
os.environ["HF_HUB_OFFLINE"] = "1"
import subprocess
import sys
import tempfile
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest

from tasks.config import preset_config
from tasks.pipeline import prepare_run

IMDB_DIR = Path(os.environ.get("LORAFLOW_DATA", Path(__file__).resolve().parents[2] / "shared/data/imdb"))

os.environ.setdefault("LORAFLOW_DATA", str(IMDB_DIR))  # the presets' data, as under `make test`
# Local sources must lie under these (tasks.sources.data_roots): the IMDB copy's folder and
# the temporary folder, where tests write their own sources (tmp_path).
os.environ.setdefault("LORAFLOW_DATA_ROOTS",
                      os.pathsep.join([str(IMDB_DIR.parent), tempfile.gettempdir()]))
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
# One intra-op thread (before torch is imported, so subprocesses inherit it too): the test
# models are tiny, and on a loaded machine two spinning OpenMP threads made batch-1
# forward passes over ten times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")


# The shrunk smoke run of the CLI tests and of the session's shared run.
TINY = {"train_size": 64, "val_size": 32, "test_size": 32, "max_length": 32}


@pytest.fixture(scope="session", autouse=True)
def shared_cache(tmp_path_factory, worker_id) -> Path:
    """One data and tokenization cache for the whole session ($LORAFLOW_CACHE, inherited by
    the CLI, Airflow and cluster processes the tests start): a fresh artifacts folder no
    longer re-normalises the full IMDB splits, re-validates the whole source or re-tokenizes
    what an earlier test tokenized. Tests that watch the cache itself use `private_cache`.
    Under pytest-xdist every worker shares it (its keys and file locks make that safe)."""
    base = tmp_path_factory.getbasetemp()
    cache = (base.parent if worker_id != "master" else base) / "cache"  # popen-gwN's parent
    cache.mkdir(exist_ok=True)
    with pytest.MonkeyPatch.context() as env:
        env.setenv("LORAFLOW_CACHE", str(cache))
        yield cache


@pytest.fixture
def private_cache(monkeypatch) -> None:
    """The cache in its default place, under the test's own artifacts root: for the tests
    that count cache hits and misses or look at what the cache holds."""
    monkeypatch.delenv("LORAFLOW_CACHE", raising=False)


@dataclass(frozen=True)
class SmokeRun:
    """The session's `loraflow run` of the smoke preset (every registered method) at TINY
    sizes."""

    done: subprocess.CompletedProcess
    artifacts: Path
    reports: Path
    run_id: str = "cli-smoke"

    @property
    def run_dir(self) -> Path:
        return self.artifacts / "runs" / self.run_id

    @property
    def report(self) -> Path:
        return self.reports / self.run_id / "report.html"


@pytest.fixture(scope="session")
def smoke_all(tmp_path_factory, imdb_dir, shared_cache) -> SmokeRun:
    """One smoke run (the preset runs every registered method) through the CLI in a
    subprocess, read by the CLI, BitFit and report tests; read-only: a test that would
    change it copies it to its tmp_path first."""
    root = tmp_path_factory.mktemp("smoke-all")
    env = {**os.environ, "LORAFLOW_ARTIFACTS": str(root / "a"),
           "LORAFLOW_REPORTS": str(root / "r"), "LORAFLOW_PROGRESS": "0"}
    sizes = [arg for key, value in TINY.items() for arg in (f"--{key.replace('_', '-')}", str(value))]
    done = subprocess.run([sys.executable, "-m", "tasks.cli", "run", "--preset", "smoke",
                           "--data", str(imdb_dir), *sizes, "--run-id", SmokeRun.run_id],
                          env=env, capture_output=True, text=True, check=False, timeout=600)
    return SmokeRun(done, root / "a", root / "r")


@pytest.fixture(scope="session")
def imdb_dir() -> Path:
    if not (IMDB_DIR / "train.parquet").exists():
        pytest.fail(f"IMDB parquet files not found in {IMDB_DIR} (set LORAFLOW_DATA)")
    return IMDB_DIR


@pytest.fixture(scope="session")
def imdb_sample(imdb_dir) -> dict[str, pd.DataFrame]:
    """400 train / 100 validation / 200 test real reviews, deterministic; validation comes
    from the training split and shares no row with train (as the download step draws it)."""
    train = pd.read_parquet(imdb_dir / "train.parquet").sample(n=500, random_state=0)
    test = pd.read_parquet(imdb_dir / "test.parquet").sample(n=200, random_state=0)
    return {"train": train.iloc[:400].reset_index(drop=True),
            "validation": train.iloc[400:].reset_index(drop=True),
            "test": test.reset_index(drop=True)}


@pytest.fixture
def artifacts(tmp_path, monkeypatch) -> Path:
    """Isolated artifacts and reports roots for one test."""
    monkeypatch.setenv("LORAFLOW_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("LORAFLOW_REPORTS", str(tmp_path / "reports"))
    return tmp_path / "artifacts"


@pytest.fixture
def smoke_config(imdb_dir):
    """The smoke preset on the local IMDB copy, shrunk further for unit tests."""
    return preset_config("smoke", data=str(imdb_dir), train_size=64, val_size=32, test_size=32,
                         max_length=32)


@pytest.fixture
def smoke_run(smoke_config, artifacts):
    """(config, paths) of a prepared smoke run in a temporary artifacts root."""
    return smoke_config, prepare_run(smoke_config, "test-run", artifacts, artifacts.parent / "reports")


# --- Airflow ---------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def airflow_db() -> Path:
    """A migrated metadata database (SQLite) in the DAG tests' throw-away home (see
    tests/dags/conftest.py), with the `gpu` pool: once per session."""
    from tests.dags.conftest import migrate_home

    return migrate_home()


_AIRFLOW = ExitStack()  # the session's real Airflow, stopped after the last test that uses it


@pytest.fixture(scope="session")
def airflow_server(tmp_path_factory, airflow_db):
    """One real Airflow (API server, scheduler, DAG processor) for the session's scheduler,
    browser and plugin tests, started from a copy of the migrated database."""
    from tests.airflow_server import running_airflow
    from tests.dags.conftest import airflow_env

    root = tmp_path_factory.mktemp("airflow-cluster")
    with _AIRFLOW:
        yield _AIRFLOW.enter_context(running_airflow(root, airflow_env(),
                                                     airflow_db / "pristine.db"))


@pytest.fixture
def airflow(airflow_server):
    """The session's real Airflow, with no DAG run left from an earlier test."""
    airflow_server.delete_runs()
    return airflow_server


# The session's costly shared runs, by the test files that read them: each group runs in one
# pytest-xdist worker (`make test` runs two), so that a run is built once, and the groups
# start first, in this order, so that they overlap the rest of the suite instead of
# trailing it. A test elsewhere that uses one of these fixtures is refused at collection.
SHARED_RUNS = {
    "cluster": ("tests/cluster/",),
    "airflow": ("tests/dags/test_scheduler.py", "tests/plugins/test_report_tab_browser.py"),
    "smoke-all": ("tests/tasks/test_cli.py", "tests/tasks/test_bitfit.py",
                  "tests/tasks/test_report_browser.py"),
    "dag-test": ("tests/dags/test_dag_run.py",),
}
FIXTURE_GROUPS = {"airflow": "airflow", "smoke_all": "smoke-all",
                  "smoke_run_with_a_broken_variant": "dag-test"}


def group_of(nodeid: str) -> str:
    """The test's xdist group: its shared run, else its file (module-scoped fixtures are
    then built once)."""
    path = nodeid.split("::")[0]
    return next((group for group, files in SHARED_RUNS.items()
                 if any(path.startswith(f) for f in files)), path)


def pytest_xdist_make_scheduler(config, log):
    """`--dist loadscope` with the groups above as scopes. (xdist's own `loadgroup` reads
    `xdist_group` marks by rewriting node ids, which pytest 9 no longer allows.)"""
    if config.getvalue("dist") != "loadscope":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SharedRunScheduling(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            return group_of(nodeid)

    return SharedRunScheduling(config, log)


def pytest_collection_modifyitems(items):
    """The shared runs' tests first, group by group, in file order within a group (the real
    Airflow's one after another, so that it can stop right after the last of them:
    pytest_runtest_teardown); then the files that hold a slow test, then the rest: the
    costly files start early, and the suite ends on short ones instead of on one worker
    finishing a long test while the others wait."""
    order = list(SHARED_RUNS)
    for item in items:
        names = set(getattr(item, "fixturenames", ()))
        for fixture, group in FIXTURE_GROUPS.items():
            if fixture in names and group_of(item.nodeid) != group:
                raise pytest.UsageError(
                    f"{item.nodeid} uses `{fixture}`: list its file in SHARED_RUNS[{group!r}] "
                    "(tests/conftest.py), or it builds a second one in another worker")
    rank = {group: i for i, group in enumerate(order)}
    slow = {group_of(item.nodeid) for item in items if item.get_closest_marker("slow")}

    def place(item) -> int:
        group = group_of(item.nodeid)
        return rank.get(group, len(order) + (group not in slow))

    items.sort(key=place)


def pytest_runtest_teardown(item, nextitem):
    if "airflow" in getattr(item, "fixturenames", ()) and (
            nextitem is None or "airflow" not in getattr(nextitem, "fixturenames", ())):
        _AIRFLOW.close()  # its processes would only load the two cores from here on
