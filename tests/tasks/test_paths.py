"""Run folders, report slugs and atomic writes: all or nothing, shared-readable, and safe
with several writers of one target."""

from __future__ import annotations

import errno
import os
import stat
import threading

import numpy as np
import pytest

from tasks import paths as paths_module
from tasks.failures import storage_error
from tasks.paths import (
    SPLITS,
    RunPaths,
    atomic_dir,
    atomic_path,
    read_json,
    report_slug,
    write_json,
)


def test_atomic_path_leaves_nothing_when_the_writer_fails(tmp_path):
    target = tmp_path / "out.json"
    with pytest.raises(RuntimeError), atomic_path(target) as tmp:
        tmp.write_text("half")
        raise RuntimeError("killed")
    assert list(tmp_path.iterdir()) == []


def test_a_full_disk_names_the_target_where_the_writer_named_none(tmp_path):
    target = tmp_path / "checkpoints" / "epoch-002"
    with pytest.raises(OSError) as raised, atomic_dir(target) as tmp:
        (tmp / "w.safetensors").write_bytes(b"half")
        raise RuntimeError("Io error: No space left on device (os error 28)")  # safetensors
    assert raised.value.errno == errno.ENOSPC and raised.value.filename == str(target)
    assert storage_error(raised.value) == (f"no space left on device writing {target}: "
                                           "free space and run again")
    assert list(target.parent.iterdir()) == []  # nothing half-written left, nothing complete

    with pytest.raises(OSError) as raised, atomic_path(tmp_path / "a.json") as tmp:
        raise OSError(errno.ENOSPC, "No space left on device")  # a bare write(): no filename
    assert raised.value.filename == str(tmp_path / "a.json")
    with pytest.raises(OSError) as raised, atomic_path(tmp_path / "b.json") as tmp:
        raise OSError(errno.ENOSPC, "No space left on device", str(tmp))
    assert raised.value.filename == str(tmp)  # a named file stays named
    with pytest.raises(RuntimeError), atomic_path(tmp_path / "c.json"):
        raise RuntimeError("not a disk error")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


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
    with atomic_dir(target) as tmp:
        (tmp / "other.bin").write_bytes(b"3")
    assert [p.name for p in target.iterdir()] == ["other.bin"]  # replaced whole, not merged
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]


def test_concurrent_writers_of_one_atomic_dir_never_raise(tmp_path):
    target = tmp_path / "model"
    errors: list[BaseException] = []
    start = threading.Barrier(8)

    def writer(i: int) -> None:
        try:
            start.wait()
            for j in range(50):
                with atomic_dir(target) as tmp:
                    (tmp / "a.txt").write_text(f"{i}-{j}")
                    (tmp / "b.txt").write_text(f"{i}-{j}")
        except BaseException as err:  # noqa: BLE001 - reported below
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == []
    # one complete folder: both files from the same writer and round
    assert sorted(p.name for p in target.iterdir()) == ["a.txt", "b.txt"]
    assert (target / "a.txt").read_text() == (target / "b.txt").read_text()
    assert [p.name for p in tmp_path.iterdir()] == ["model"]  # no temporary or set-aside folder


def test_concurrent_writers_of_one_file_never_raise(tmp_path):
    target = tmp_path / "x.json"
    errors: list[BaseException] = []

    def writer(i: int) -> None:
        try:
            for j in range(50):
                write_json(target, {"writer": i, "round": j})
        except BaseException as err:  # noqa: BLE001
            errors.append(err)

    threads = [threading.Thread(target=writer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert errors == [] and read_json(target)["round"] == 49
    assert [p.name for p in tmp_path.iterdir()] == ["x.json"]


@pytest.mark.parametrize("umask, file_mode, dir_mode", [(0o022, 0o644, 0o755),
                                                        (0o027, 0o640, 0o750)])
def test_atomic_writes_get_the_umasks_permissions_even_for_safetensors(tmp_path, monkeypatch,
                                                                      umask, file_mode, dir_mode):
    from safetensors.numpy import save_file

    previous = os.umask(umask)
    try:
        monkeypatch.setattr(paths_module, "UMASK", umask)  # read once at import
        target = tmp_path / "adapter"
        with atomic_dir(target) as tmp:
            save_file({"w": np.zeros(3, dtype=np.float32)}, str(tmp / "model.safetensors"))
            (tmp / "sub").mkdir()
            write_json(tmp / "sub" / "config.json", {"r": 4})
        single = write_json(tmp_path / "metrics.json", {"ok": True})
    finally:
        os.umask(previous)
    for path, mode in ((target / "model.safetensors", file_mode),
                       (target / "sub" / "config.json", file_mode), (single, file_mode),
                       (target, dir_mode), (target / "sub", dir_mode)):
        assert stat.S_IMODE(os.stat(path).st_mode) == mode, path


def test_umask_is_the_process_umask():
    mask = os.umask(0)
    os.umask(mask)
    assert paths_module.UMASK == mask


def test_read_json_names_a_damaged_file(tmp_path):
    bad = tmp_path / "metrics.json"
    bad.write_text('{"status": ')
    with pytest.raises(ValueError, match=f"{bad} is not valid JSON"):
        read_json(bad)
    bad.write_bytes(b"\xff\xfe")
    with pytest.raises(ValueError, match="metrics.json"):
        read_json(bad)


# "x\n": a trailing newline once passed (re.match with `$`) and named a folder with it
@pytest.mark.parametrize("bad", ["../escape", "a/b", "", "..", ".", "run\n", "run\nx"])
def test_run_ids_cannot_escape_the_runs_folder(tmp_path, bad):
    with pytest.raises(ValueError, match="run id"):
        RunPaths.for_run(bad, tmp_path, tmp_path)


def test_airflow_run_ids_are_accepted_and_round_trip(tmp_path):
    run_id = "manual__2026-11-29T05:00:00+00:00"
    paths = RunPaths.for_run(run_id, tmp_path, tmp_path / "r")
    assert paths.run_dir == tmp_path / "runs" / run_id
    assert RunPaths.from_run_dir(paths.run_dir, tmp_path / "r") == paths
    assert paths.report_dir == tmp_path / "r" / report_slug(run_id)


def test_report_slug_keeps_plain_ids_and_makes_others_url_safe_and_unique():
    assert report_slug("local__2026-11-29T14-32-26.123456_3f9a1c") == (
        "local__2026-11-29T14-32-26.123456_3f9a1c")
    slug = report_slug("manual__2026-11-29T05:00:00+00:00")
    assert slug == "manual__2026-11-29T05~3A00~3A00~2B00~3A00"
    assert all(c.isalnum() or c in "._-~" for c in slug)
    # Reversible: ':' '+' and '-' never map to the same text, so two runs never share a folder
    assert len({report_slug("a:b"), report_slug("a+b"), report_slug("a-b")}) == 3
    assert report_slug("a-b") == "a-b" and report_slug(".a") == "~2Ea"
    assert report_slug("a:b") == report_slug("a:b")


def test_run_paths_name_three_splits(tmp_path):
    paths = RunPaths.for_run("r", tmp_path, tmp_path)
    assert SPLITS == ("train", "validation", "test")
    assert [paths.split_parquet(s).name for s in SPLITS] == [
        "train.parquet", "validation.parquet", "test.parquet"]
    assert paths.validation_parquet == paths.split_parquet("validation")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        paths.split_parquet("dev")


def test_the_cache_lives_under_the_artifacts_unless_loraflow_cache_names_one(tmp_path,
                                                                             monkeypatch):
    monkeypatch.delenv("LORAFLOW_CACHE", raising=False)
    paths = RunPaths.for_run("r", tmp_path / "a", tmp_path / "r")
    assert paths.cache_dir == (tmp_path / "a" / "cache").resolve()
    monkeypatch.setenv("LORAFLOW_CACHE", str(tmp_path / "shared"))
    assert paths.cache_dir == (tmp_path / "shared").resolve()
    other = RunPaths.for_run("r", tmp_path / "b", tmp_path / "r")  # one cache, many roots
    assert other.cache_dir == paths.cache_dir and other.run_dir != paths.run_dir
