"""A run folder and a variant have one owner at a time; the OS lock dies with its holder."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from tasks.paths import InUse, exclusive
from tasks.pipeline import new_run_id

HOLD = ("import sys, time; from pathlib import Path; from tasks.paths import exclusive\n"
        "with exclusive(Path(sys.argv[1]), 'run x'):\n"
        "    print('held', flush=True); time.sleep(60)")


def _holder(lock):
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(lock)], stdout=subprocess.PIPE,
                            text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_owner_fails_at_once_naming_the_holder(tmp_path):
    proc = _holder(tmp_path / ".lock")
    try:
        started = time.monotonic()
        with pytest.raises(InUse, match=f"run x is in use by process {proc.pid}"):
            with exclusive(tmp_path / ".lock", "run x"):
                pass
        assert time.monotonic() - started < 2
    finally:
        proc.kill()
        proc.wait()


def test_the_lock_dies_with_a_killed_holder(tmp_path):
    proc = _holder(tmp_path / ".lock")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    with exclusive(tmp_path / ".lock", "run x"):  # a retry after a crash proceeds
        pass


def test_two_cli_runs_with_one_run_id_cannot_both_own_it(tmp_path, imdb_dir):
    from tasks.cli import main
    from tasks.config import preset_config
    from tasks.pipeline import prepare_run

    config = preset_config("smoke", data=str(imdb_dir), methods=["majority"])
    paths = prepare_run(config, "shared", tmp_path / "a", tmp_path / "r")
    proc = _holder(paths.run_dir / ".lock")  # as `loraflow run --run-id shared` holds it
    try:
        code = main(["run", "--preset", "smoke", "--data", str(imdb_dir), "--methods",
                     "majority", "--run-id", "shared", "--artifacts", str(tmp_path / "a"),
                     "--reports", str(tmp_path / "r")])
        assert code == 2
        assert not (paths.results_dir / "majority").exists()  # it touched nothing
    finally:
        proc.kill()
        proc.wait()


def test_default_run_ids_are_unique_even_in_the_same_second():
    ids = {new_run_id() for _ in range(200)}
    assert len(ids) == 200
