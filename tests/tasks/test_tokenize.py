"""The tokenization cache on real IMDB reviews: statistics, keys, cache hits, corruption,
row order, and two processes racing on one key."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from transformers import PreTrainedTokenizerBase

import tasks.tokenize as tk
from tasks.models import load_tokenizer
from tasks.paths import PROJECT_DIR, SPLITS, read_json
from tasks.pipeline import prepare_run
from tests.tasks.conftest import write_run_data

pytestmark = pytest.mark.usefixtures("private_cache")  # cache hits and misses are counted here


@pytest.fixture
def count_encodes(monkeypatch):
    """Count calls of the function that runs the tokenizer."""
    calls: list[int] = []
    original = tk.encode_texts

    def counting(tokenizer, texts, *args, **kwargs):
        calls.append(len(texts))
        return original(tokenizer, texts, *args, **kwargs)

    monkeypatch.setattr(tk, "encode_texts", counting)
    return calls


def test_tokenize_writes_cache_and_pre_truncation_stats(run, imdb_sample):
    config, paths = run
    tokens = read_json(tk.tokenize_dataset(config, paths))
    assert tokens["cache_hit"] is False and tokens["max_length"] == 32
    folder = Path(tokens["cache_dir"])
    assert folder.name == tokens["key"] and folder.parent == paths.cache_dir / "tokenized"
    assert {p.name for p in folder.iterdir()} == {"train.parquet", "validation.parquet",
                                                  "test.parquet", "meta.json"}
    assert tokens["rows"] == {"train": 400, "validation": 100, "test": 200}
    tokenizer = load_tokenizer(config.model)
    for split in SPLITS:
        stats = tokens["stats"][split]
        full = np.array([len(ids) for ids in tokenizer(imdb_sample[split]["text"].tolist())["input_ids"]])
        assert stats["count"] == len(imdb_sample[split]) == sum(stats["histogram"]["counts"])
        assert len(stats["histogram"]["bin_edges"]) == len(stats["histogram"]["counts"]) + 1
        # lengths are measured before truncation: they match an untruncated tokenizer call
        assert stats["mean"] == pytest.approx(full.mean()) and stats["max"] == full.max()
        assert stats["truncated_share"] == pytest.approx((full > 32).mean())
        assert 0 < stats["truncated_share"] <= 1  # most IMDB reviews exceed 32 tokens
        assert stats["median"] <= stats["p95"] <= stats["max"]


def test_load_split_keeps_row_order_columns_and_truncation(run, imdb_sample):
    config, paths = run
    tk.tokenize_dataset(config, paths)
    tokenizer = load_tokenizer(config.model)
    for split in SPLITS:
        frame = tk.load_split(paths, split)
        data = imdb_sample[split]
        assert list(frame.columns) == ["input_ids", "length", "label"]
        assert frame["label"].dtype == np.int64 and frame["length"].dtype == np.int64
        np.testing.assert_array_equal(frame["label"].to_numpy(), data["label"].to_numpy())
        assert (frame["length"] == frame["input_ids"].map(len)).all() and frame["length"].max() == 32
        for row in (0, 7, len(data) - 1):  # same ids as a direct call, row by row
            expected = tokenizer(data["text"][row], truncation=True, max_length=32)["input_ids"]
            assert list(frame["input_ids"][row]) == expected
            assert expected[0] == tokenizer.cls_token_id and expected[-1] == tokenizer.sep_token_id


def test_load_split_refuses_unknown_split_and_missing_tokens(run):
    _, paths = run
    with pytest.raises(FileNotFoundError, match="tokenize step"):
        tk.load_split(paths, "test")
    with pytest.raises(ValueError, match="unknown split 'dev'"):
        tk.load_split(paths, "dev")


def test_second_run_with_same_key_calls_no_tokenizer(run, imdb_sample, artifacts, monkeypatch):
    config, paths = run
    first = read_json(tk.tokenize_dataset(config, paths))

    def boom(*args, **kwargs):
        raise AssertionError("the tokenizer was called on a cache hit")

    for cls in (PreTrainedTokenizerBase, type(load_tokenizer(config.model))):
        monkeypatch.setattr(cls, "__call__", boom)
    monkeypatch.setattr(tk, "encode_texts", boom)
    other = prepare_run(config, "second-run", artifacts, artifacts.parent / "reports")
    write_run_data(other, imdb_sample)  # another run, same data: the cache is shared
    second = read_json(tk.tokenize_dataset(config, other))
    assert second["cache_hit"] is True and second["key"] == first["key"]
    assert second["stats"] == first["stats"]
    pd.testing.assert_frame_equal(tk.load_split(other, "test"), tk.load_split(paths, "test"))


def test_max_length_and_data_are_part_of_the_key(run, imdb_sample, artifacts, count_encodes):
    config, paths = run
    base = read_json(tk.tokenize_dataset(config, paths))["key"]
    longer = prepare_run(config.with_overrides(max_length=64), "longer", artifacts)
    write_run_data(longer, imdb_sample)
    changed = prepare_run(config, "changed-data", artifacts)
    edited = {s: f.copy() for s, f in imdb_sample.items()}
    edited["test"].loc[3, "text"] += " One more sentence."
    write_run_data(changed, edited)
    keys = {base, read_json(tk.tokenize_dataset(config.with_overrides(max_length=64), longer))["key"],
            read_json(tk.tokenize_dataset(config, changed))["key"]}
    assert len(keys) == 3 and len(count_encodes) == 9  # three builds of three splits each
    assert tk.load_split(longer, "train")["length"].max() == 64


def test_head_tail_keeps_the_first_and_last_tokens_and_changes_the_key(run, artifacts):
    """A review of numbered words: `head` keeps its first 30 word tokens, `head_tail` its
    first 8 and last 22 (a quarter of the budget to the head), special tokens around both,
    and the two are cached under different keys."""
    config, paths = run  # max_length 32: 30 review tokens beside [CLS] and [SEP]
    tokenizer = load_tokenizer(config.model)
    words = [f"w{i}" for i in range(100)]
    pieces = tokenizer(" ".join(words), add_special_tokens=False)["input_ids"]
    head, _ = tk.encode_texts(tokenizer, [" ".join(words)], 32, "head")
    both, full = tk.encode_texts(tokenizer, [" ".join(words)], 32, "head_tail")
    cls, sep = tokenizer.cls_token_id, tokenizer.sep_token_id
    assert head[0] == [cls, *pieces[:30], sep]
    assert both[0] == [cls, *pieces[:8], *pieces[-22:], sep]
    assert full[0] == len(pieces) + 2
    keys = {t: read_json(tk.tokenize_dataset(config.with_overrides(truncation=t), paths))["key"]
            for t in ("head", "head_tail")}
    assert keys["head"] != keys["head_tail"]
    cached = tk.load_split(paths, "train")  # tokens.json now points at the head_tail cache
    assert read_json(paths.tokens_json)["truncation_settings"]["tail_tokens"] == 22
    assert cached["length"].max() == 32


@pytest.mark.parametrize("damage", ["delete_meta", "truncate_parquet", "garble_meta"])
def test_incomplete_cache_is_never_a_hit(run, count_encodes, damage):
    config, paths = run
    folder = Path(read_json(tk.tokenize_dataset(config, paths))["cache_dir"])
    if damage == "delete_meta":
        (folder / "meta.json").unlink()
    elif damage == "garble_meta":
        (folder / "meta.json").write_text('{"key": ')
    else:  # fewer rows than meta.json promises
        pd.read_parquet(folder / "test.parquet").head(5).to_parquet(folder / "test.parquet")
    tokens = read_json(tk.tokenize_dataset(config, paths))
    assert tokens["cache_hit"] is False and len(count_encodes) == 6  # two builds, three splits
    assert len(tk.load_split(paths, "test")) == 200


def _damage(file: Path, damage: str) -> None:
    """Damage a cached split as a disk or a hand might; the footer stays intact."""
    if damage == "flipped_bytes":  # inside the column data, before the footer
        raw = bytearray(file.read_bytes())
        footer = int.from_bytes(raw[-8:-4], "little") + 8
        middle = (len(raw) - footer) // 2
        raw[middle:middle + 16] = bytes(b ^ 0xFF for b in raw[middle:middle + 16])
        file.write_bytes(bytes(raw))
        return
    frame = pd.read_parquet(file)  # a valid file with the same rows
    if damage == "labels_altered":
        frame["label"] = 1 - frame["label"]
    else:  # token ids past the vocabulary: an IndexError in the embedding, deep in training
        frame["input_ids"] = frame["input_ids"].map(lambda ids: ids + 10**6)
    frame.to_parquet(file, index=False)


DAMAGES = ["flipped_bytes", "labels_altered", "ids_out_of_vocabulary"]


@pytest.mark.parametrize("damage", DAMAGES)
def test_a_damaged_cached_split_is_rebuilt_with_a_warning_naming_it(run, imdb_sample,
                                                                    count_encodes, damage, caplog):
    """The footer alone was checked: flipped bytes or other labels were a cache hit."""
    config, paths = run
    folder = Path(read_json(tk.tokenize_dataset(config, paths))["cache_dir"])
    _damage(folder / "test.parquet", damage)
    with caplog.at_level(logging.WARNING, logger="tasks.tokenize"):
        tokens = read_json(tk.tokenize_dataset(config, paths))
    assert tokens["cache_hit"] is False and len(count_encodes) == 6  # two builds, three splits
    assert f"tokenization cache {folder}: the SHA-256 of test.parquet differs" in caplog.text
    frame = tk.load_split(paths, "test")
    np.testing.assert_array_equal(frame["label"], imdb_sample["test"]["label"])
    assert frame["input_ids"].map(max).max() < load_tokenizer(config.model).vocab_size


@pytest.mark.parametrize("damage", DAMAGES)
def test_load_split_refuses_a_damaged_split_naming_it(run, damage):
    """Training failed later with `IndexError: index out of range in self`, or trained on
    wrong labels without a word."""
    config, paths = run
    folder = Path(read_json(tk.tokenize_dataset(config, paths))["cache_dir"])
    _damage(folder / "test.parquet", damage)
    with pytest.raises(ValueError, match=f"{folder / 'test.parquet'} differs from the SHA-256 "
                                         ".* run the tokenize step again"):
        tk.load_split(paths, "test")
    assert len(tk.load_split(paths, "train")) == 400  # the undamaged splits still load


def test_load_split_refuses_tokens_whose_labels_are_not_the_runs(run, imdb_sample):
    config, paths = run
    tk.tokenize_dataset(config, paths)
    changed = imdb_sample["validation"].assign(label=1 - imdb_sample["validation"]["label"])
    changed.to_parquet(paths.validation_parquet, index=False)  # same rows, other labels
    with pytest.raises(ValueError, match=r"100 of 100 labels in .*validation.parquet differ from "
                                         r".*data/validation.parquet: .*tokenize step again"):
        tk.load_split(paths, "validation")


def test_a_cache_hit_takes_no_lock_so_a_read_only_cache_serves(run, imdb_sample, artifacts,
                                                               monkeypatch):
    """Tests run as root, where chmod cannot make a folder read-only: FileLock raising
    stands for a read-only cache."""
    config, paths = run
    first = read_json(tk.tokenize_dataset(config, paths))
    root = tk.tokenized_root(paths)
    for lock in root.glob("*.lock"):
        lock.unlink()

    def read_only(*args, **kwargs):
        raise PermissionError("[Errno 30] Read-only file system")

    monkeypatch.setattr(tk, "FileLock", read_only)
    other = prepare_run(config, "second-run", artifacts, artifacts.parent / "reports")
    write_run_data(other, imdb_sample)
    second = read_json(tk.tokenize_dataset(config, other))
    assert second["cache_hit"] is True and second["key"] == first["key"]
    assert len(tk.load_split(other, "test")) == 200 and not list(root.glob("*.lock"))


def test_a_killed_builders_temporaries_are_removed_by_the_next_builder(run, count_encodes):
    """`.<key>.*.tmp` folders of a SIGKILLed builder stayed for ever."""
    config, paths = run
    folder = Path(read_json(tk.tokenize_dataset(config, paths))["cache_dir"])
    (folder / "meta.json").unlink()  # the next call builds again
    leftovers = [folder.with_name(f".{folder.name}.k1ll3d.tmp"),
                 folder.with_name(f".{folder.name}.old.123.abcd1234")]
    for leftover in leftovers:
        leftover.mkdir()
        (leftover / "train.parquet").write_bytes(b"half")
    another_key = folder.with_name(f".{'0' * 64}.k1ll3d.tmp")  # its builder may be alive: kept
    another_key.mkdir()
    assert read_json(tk.tokenize_dataset(config, paths))["cache_hit"] is False
    assert not [p for p in leftovers if p.exists()] and another_key.is_dir()


RACER = textwrap.dedent("""
    import os, sys, time
    from pathlib import Path
    import tasks.models  # heavy imports before the start line, so both start together
    import tasks.tokenize as tk
    from tasks.pipeline import load_run

    marker, start_dir, run_dir = Path(sys.argv[1]), Path(sys.argv[2]), sys.argv[3]
    original = tk.encode_texts

    def counting(*args, **kwargs):
        with marker.open("a") as f:
            f.write(f"{os.getpid()}\\n")
        time.sleep(1.0)  # hold the lock long enough for the other process to queue on it
        return original(*args, **kwargs)

    tk.encode_texts = counting
    (start_dir / f"ready-{os.getpid()}").touch()
    deadline = time.monotonic() + 60
    while len(list(start_dir.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        time.sleep(0.01)
    config, paths = load_run(run_dir)
    tk.tokenize_dataset(config, paths)
""")


@pytest.mark.slow
def test_two_processes_racing_on_one_key_tokenize_once(smoke_config, artifacts, imdb_sample, tmp_path):
    runs = [prepare_run(smoke_config, f"race-{i}", artifacts) for i in range(2)]
    for paths in runs:
        write_run_data(paths, imdb_sample)
    script, marker, start = tmp_path / "racer.py", tmp_path / "tokenizer-calls.txt", tmp_path / "start"
    script.write_text(RACER)
    start.mkdir()
    env = {**os.environ, "PYTHONPATH": str(PROJECT_DIR)}
    procs = [subprocess.Popen([sys.executable, str(script), str(marker), str(start), str(p.run_dir)],
                              cwd=PROJECT_DIR, env=env, stderr=subprocess.PIPE, text=True)
             for p in runs]
    for proc in procs:
        _, err = proc.communicate(timeout=180)
        assert proc.returncode == 0, err[-3000:]
    builders = marker.read_text().split()
    assert len(builders) == len(SPLITS) and len(set(builders)) == 1  # one process, every split
    results = sorted((read_json(p.tokens_json) for p in runs), key=lambda t: t["cache_hit"])
    assert [t["cache_hit"] for t in results] == [False, True]
    assert results[0]["key"] == results[1]["key"]
    assert results[1]["seconds"] > 0.5  # the second process waited on the lock
    folder = Path(results[0]["cache_dir"])
    assert not [p for p in folder.parent.iterdir() if p.name.startswith(".")]  # no temp left
    for paths in runs:
        assert len(tk.load_split(paths, "train")) == 400
