"""Tokenize a run's data once, into a cache shared by every run and variant.

`tokenize_dataset` stores unpadded token ids (training pads per batch) under
`<artifacts>/cache/tokenized/<key>/` and points the run's `data/tokens.json` at them.
The key hashes everything the tokens depend on: the texts and labels, the tokenizer
(class, name, vocabulary hash), `max_length` and the truncation settings, so a second run
with the same key never calls the tokenizer (the seed notebook tokenized inside every
training and evaluation step, which cost more than some of its steps).

Cache folder: one `<split>.parquet` per subset (`input_ids` list<int32>, `length`, `label`,
rows in the order of `data/<split>.parquet`) and `meta.json`, written last, with the SHA-256
of each parquet file: a folder is a cache hit only if its `meta.json` is complete and every
file matches its checksum (a damaged file is rebuilt, with a warning naming it), and
`load_split` checks the file it reads, and its labels against the run's data, again. A hit
takes no lock, so a read-only cache serves; builders of one key serialise on `<key>.lock`,
remove what a killed builder left, write into a temporary folder renamed into place
(`tasks.paths.atomic_dir`), and a waiter finds the finished cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq
from filelock import FileLock
from tqdm.auto import tqdm

from tasks.config import ExperimentConfig
from tasks.environment import progress_disabled
from tasks.metrics import now_iso
from tasks.paths import (
    SPLITS,
    RunPaths,
    atomic_dir,
    checksums,
    damaged_files,
    read_json,
    remove_leftovers,
    sha256_file,
    write_json,
)
from tasks.steps import StepNotRun
from tasks.text import cut, head_tokens

log = logging.getLogger(__name__)

CACHE_FORMAT = 4  # bump when the stored layout changes: old caches then miss
BATCH_SIZE = 2048  # texts per tokenizer call: Rust parallelism inside, bounded memory
HISTOGRAM_BINS = 30
LOCK_TIMEOUT_S = 3600.0  # a builder holding the lock longer than this is presumed stuck
SPLIT_FILES = [f"{split}.parquet" for split in SPLITS]  # meta.json's "sha256" has one each


def tokenized_root(paths: RunPaths) -> Path:
    return paths.cache_dir / "tokenized"


# --- the cache key ----------------------------------------------------------------------------

def data_fingerprint(frame: pd.DataFrame) -> str:
    """sha256 over (label, text) of every row, in order: content, not file bytes, so the
    same data re-written by another pandas/pyarrow version still hits."""
    h = hashlib.sha256()
    for label, text in zip(frame["label"].to_numpy(), frame["text"].tolist()):
        encoded = str(text).encode("utf-8")
        h.update(f"{int(label)}\t{len(encoded)}\t".encode())  # length prefix: no ambiguity
        h.update(encoded)
    return h.hexdigest()


def truncation_settings(tokenizer: Any, max_length: int, truncation: str) -> dict[str, Any]:
    """What decides which tokens of a long review are kept (part of the cache key)."""
    budget = max_length - tokenizer.num_special_tokens_to_add(pair=False)
    head = budget if truncation == "head" else min(head_tokens(budget), budget - 1)
    return {"strategy": truncation, "head_tokens": head, "tail_tokens": budget - head,
            "add_special_tokens": True}


def cache_key(fingerprints: dict[str, str], identity: dict[str, str], max_length: int,
              truncation: dict[str, Any]) -> str:
    material = {"format": CACHE_FORMAT, "data": fingerprints, "tokenizer": identity,
                "max_length": max_length, "truncation": truncation}
    return hashlib.sha256(json.dumps(material, sort_keys=True).encode()).hexdigest()


# --- tokenizing -------------------------------------------------------------------------------

def encode_texts(tokenizer: Any, texts: list[str], max_length: int, truncation: str = "head",
                 desc: str = "tokenize") -> tuple[list[list[int]], np.ndarray]:
    """(input ids with special tokens, at most `max_length`; full lengths before the cut).

    Each batch is tokenized whole, without special tokens; `tasks.text.cut` keeps the
    head (or head and tail) that fits beside the special tokens, which the tokenizer then
    adds itself. For `head` this gives exactly what `truncation=True` gives."""
    before, after = special_tokens_around(tokenizer)
    n_special = len(before) + len(after)
    budget = max_length - n_special
    ids: list[list[int]] = []
    full = np.zeros(len(texts), dtype=np.int64)
    for start in tqdm(range(0, len(texts), BATCH_SIZE), desc=desc, unit="batch", leave=False,
                      disable=progress_disabled()):
        enc = tokenizer(texts[start:start + BATCH_SIZE], add_special_tokens=False,
                        truncation=False, verbose=False, return_attention_mask=False,
                        return_token_type_ids=False)
        for i, row in enumerate(enc["input_ids"]):
            full[start + i] = len(row) + n_special
            ids.append(before + cut(row, budget, truncation) + after)
    if len(ids) != len(texts):
        raise RuntimeError(f"tokenizer returned {len(ids)} sequences for {len(texts)} texts")
    return ids, full


def special_tokens_around(tokenizer: Any) -> tuple[list[int], list[int]]:
    """The special tokens a single sequence gets before and after its text ([CLS], [SEP]
    for BERT-family tokenizers), read off the tokenizer's own output for a one-token text
    (transformers 5 tokenizers no longer expose build_inputs_with_special_tokens)."""
    word = tokenizer("a", add_special_tokens=False)["input_ids"]
    wrapped = tokenizer("a")["input_ids"]
    assert len(word) == 1 and wrapped.count(word[0]) == 1, (word, wrapped)
    at = wrapped.index(word[0])
    return wrapped[:at], wrapped[at + 1:]


def length_stats(full_lengths: np.ndarray, max_length: int) -> dict[str, Any]:
    """Distribution of token counts BEFORE truncation, so the truncated share is real."""
    lengths = np.asarray(full_lengths, dtype=np.int64)
    counts, edges = np.histogram(lengths, bins=HISTOGRAM_BINS)
    return {
        "count": len(lengths),
        "mean": float(lengths.mean()),
        "median": float(np.median(lengths)),
        "p95": float(np.percentile(lengths, 95)),
        "max": int(lengths.max()),
        "min": int(lengths.min()),
        "truncated_share": float((lengths > max_length).mean()),
        "mean_after_truncation": float(np.minimum(lengths, max_length).mean()),
        # the share of an average review's tokens the encoder reads
        "mean_share_read": float((np.minimum(lengths, max_length) / np.maximum(lengths, 1)).mean()),
        "histogram": {"bin_edges": edges.tolist(), "counts": counts.tolist()},
    }


def _write_split(path: Path, ids: list[list[int]], labels: np.ndarray) -> None:
    table = pa.table({
        "input_ids": pa.array(ids, type=pa.list_(pa.int32())),
        "length": pa.array([len(x) for x in ids], type=pa.int32()),
        "label": pa.array(np.asarray(labels, dtype=np.int64)),
    })
    pq.write_table(table, path)


# --- the cache folder -------------------------------------------------------------------------

def read_meta(folder: Path, key: str) -> dict[str, Any] | None:
    """The folder's meta.json if it describes a cache for `key` in this format, else None
    (missing or unreadable meta, another key or format). The files are not checked here."""
    try:
        meta = read_json(folder / "meta.json")
    except (OSError, ValueError):
        return None
    if not isinstance(meta, dict) or meta.get("key") != key or meta.get("format") != CACHE_FORMAT:
        return None
    return meta


def read_valid_meta(folder: Path, key: str, *, warn: bool = True) -> dict[str, Any] | None:
    """The folder's meta.json if the folder is a complete, undamaged cache for `key`, else
    None. A file whose SHA-256 differs from meta.json's is logged (when `warn`)."""
    meta = read_meta(folder, key)
    if meta is None:
        return None
    try:
        damaged = damaged_files(folder, {name: meta["sha256"][name] for name in SPLIT_FILES})
    except (OSError, KeyError, TypeError):
        return None
    if damaged:
        if warn:
            log.warning("tokenization cache %s: the SHA-256 of %s differs from its meta.json "
                        "(damaged on disk); rebuilding it", folder, ", ".join(damaged))
        return None
    return meta


def _build(folder: Path, frames: dict[str, pd.DataFrame], tokenizer: Any, key: str,
           material: dict[str, Any], max_length: int) -> dict[str, Any]:
    started = time.perf_counter()
    stats = {}
    with atomic_dir(folder) as tmp:
        for split in SPLITS:
            frame = frames[split]
            ids, full = encode_texts(tokenizer, frame["text"].astype(str).tolist(), max_length,
                                     material["truncation"]["strategy"], desc=f"tokenize {split}")
            _write_split(tmp / f"{split}.parquet", ids, frame["label"].to_numpy())
            stats[split] = length_stats(full, max_length)
        meta = {"key": key, "format": CACHE_FORMAT, **material,
                "rows": {s: len(frames[s]) for s in SPLITS}, "stats": stats,
                "sha256": checksums(tmp, SPLIT_FILES),
                "build_seconds": round(time.perf_counter() - started, 3), "created_at": now_iso()}
        write_json(tmp / "meta.json", meta)  # last: its presence marks a complete folder
    log.info("tokenized %s in %.1f s into %s", {s: len(frames[s]) for s in SPLITS},
             meta["build_seconds"], folder)
    return meta


def tokenize_dataset(config: ExperimentConfig, paths: RunPaths) -> Path:
    """Tokenize data/{train,test}.parquet into the shared cache (or find it there) and
    write data/tokens.json: key, cache folder, tokenizer identity, length statistics and
    whether it was a cache hit."""
    from tasks.models import load_tokenizer, tokenizer_identity

    started = time.perf_counter()
    frames = {}
    for split in SPLITS:
        path = paths.split_parquet(split)
        if not path.exists():
            raise StepNotRun(path, "download")
        frames[split] = pd.read_parquet(path, columns=["text", "label"])
    # Loading is needed for the vocabulary hash in the key; tokenizing is what we avoid.
    tokenizer = load_tokenizer(config.model)
    material = {"data": {s: data_fingerprint(frames[s]) for s in SPLITS},
                "tokenizer": tokenizer_identity(tokenizer), "max_length": config.max_length,
                "truncation": truncation_settings(tokenizer, config.max_length, config.truncation)}
    key = cache_key(material["data"], material["tokenizer"], config.max_length,
                    material["truncation"])
    root = tokenized_root(paths)
    folder = root / key
    meta = read_valid_meta(folder, key)  # a verified hit takes no lock: a read-only cache serves
    hit = meta is not None
    if meta is None:
        root.mkdir(parents=True, exist_ok=True)
        with FileLock(str(root / f"{key}.lock"), timeout=LOCK_TIMEOUT_S):
            remove_leftovers(folder)  # of a killed builder: no other builder of key is alive
            # another process may have built it meanwhile (damage was logged above)
            meta = read_valid_meta(folder, key, warn=False)
            hit = meta is not None
            if meta is None:
                meta = _build(folder, frames, tokenizer, key, material, config.max_length)
    if hit:
        log.info("tokenization cache hit: %s", folder)
    return write_json(paths.tokens_json, {
        "key": key, "cache_dir": str(folder), "model": config.model, "tokenizer": meta["tokenizer"],
        "max_length": meta["max_length"], "truncation": config.truncation,
        "truncation_settings": meta["truncation"], "stats": meta["stats"], "cache_hit": hit,
        "rows": meta["rows"], "build_seconds": meta["build_seconds"],
        "seconds": round(time.perf_counter() - started, 3),
    })


def load_split(paths: RunPaths, split: str) -> pd.DataFrame:
    """Tokenized `split` of the run: columns `input_ids` (int32 array, unpadded, with
    special tokens), `length`, `label` (int64), rows in the order of data/<split>.parquet.
    The file is checked against its SHA-256 and its labels against the run's data first:
    a damaged cache is a clear error here, not an index error deep in training."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
    if not paths.tokens_json.exists():
        raise StepNotRun(paths.tokens_json, "tokenize")
    tokens = read_json(paths.tokens_json)
    folder = Path(tokens["cache_dir"])
    if not folder.exists():  # the artifacts root was moved or mounted elsewhere
        folder = tokenized_root(paths) / tokens["key"]
    meta = read_meta(folder, tokens["key"])
    if meta is None:
        raise StepNotRun(f"tokenization cache {folder}", "tokenize", again=True,
                         state="is missing or incomplete")
    file = folder / f"{split}.parquet"
    if not file.exists():
        raise StepNotRun(file, "tokenize", again=True)
    if sha256_file(file) != meta["sha256"][file.name]:
        raise ValueError(f"{file} differs from the SHA-256 in {folder / 'meta.json'}: the "
                         "tokenization cache was damaged on disk; run the tokenize step again "
                         "(it rebuilds the damaged cache)")
    frame = pd.read_parquet(file, columns=["input_ids", "length", "label"])
    _check_labels(frame, file, paths.split_parquet(split))
    frame["length"] = frame["length"].astype(np.int64)
    return frame


def _check_labels(tokens: pd.DataFrame, file: Path, data: Path) -> None:
    """The tokens' labels are the run's labels, row for row."""
    if not data.exists():
        raise StepNotRun(data, "download")
    labels = pd.read_parquet(data, columns=["label"])["label"].to_numpy()
    if len(labels) != len(tokens):
        raise ValueError(f"{data} has {len(labels)} rows but its tokens ({file}) have "
                         f"{len(tokens)}: the data changed, run the tokenize step again")
    differ = int((labels != tokens["label"].to_numpy()).sum())
    if differ:
        raise ValueError(f"{differ} of {len(labels)} labels in {file} differ from {data}: the "
                         "data changed after tokenizing, run the tokenize step again")
