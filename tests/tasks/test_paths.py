import os

import pytest

from tasks.paths import RunPaths, atomic_dir, atomic_path, read_json, write_json


def test_atomic_path_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_replace_and_are_readable_by_others(tmp_path):
    target = write_json(tmp_path / "a.json", {"x": 1})
    write_json(target, {"x": 2})
    assert read_json(target) == {"x": 2}
    assert os.stat(target).st_mode & 0o044  # group/other can read (umask permitting)
    assert [p.name for p in tmp_path.iterdir()] == ["a.json"]


def test_atomic_dir_replaces_whole_folder_or_nothing(tmp_path):
    target = tmp_path / "adapter"
    with atomic_dir(target) as tmp:
        (tmp / "w.bin").write_bytes(b"1")
    with pytest.raises(ValueError), atomic_dir(target) as tmp:
        (tmp / "w.bin").write_bytes(b"2")
        raise ValueError("bad")
    assert (target / "w.bin").read_bytes() == b"1"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


@pytest.mark.parametrize("bad", ["../escape", "a/b", "", ".."])
def test_run_ids_cannot_escape_the_runs_folder(tmp_path, bad):
    with pytest.raises(ValueError, match="run id"):
        RunPaths.for_run(bad, tmp_path, tmp_path)


def test_airflow_run_ids_are_accepted_and_round_trip(tmp_path):
    paths = RunPaths.for_run("manual__2026-11-29T05:00:00+00:00", tmp_path, tmp_path / "r")
    assert paths.run_dir == tmp_path / "runs" / "manual__2026-11-29T05:00:00+00:00"
    assert RunPaths.from_run_dir(paths.run_dir, tmp_path / "r") == paths
