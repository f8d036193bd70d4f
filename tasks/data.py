"""Step 1: fetch IMDB and write the run's deterministic train/validation/test subsets.

The source (hub, an aclImdb archive's URL, a local folder) is tasks.sources': its two
normalised full splits, cached once per source. Subsets are drawn from the normalised,
deduplicated splits (no text in two subsets); validation takes the training split's next
rows after the training subset, and the test subset comes from a random stream of its own.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pandas as pd

from tasks.config import ExperimentConfig
from tasks.paths import RunPaths, atomic_path, write_json
from tasks.sources import SOURCE_SPLITS, UnreadableData, load_full_splits, normalised_texts
from tasks.text import normalise as normalise_text

log = logging.getLogger(__name__)

TEST_STREAM = 1  # the test subset's shuffle: its own stream, not the training split's order


def download_dataset(config: ExperimentConfig, paths: RunPaths) -> dict[str, str]:
    """Write the run's three subsets, `data/{train,validation,test}.parquet`, and
    `data/draw.json` (what deduplication removed).

    Texts are normalised (`tasks.text.normalise`) and deduplicated across the whole source
    before drawing: a text seen earlier (in the training split, then the test split) is
    dropped, so no review is in two subsets. The training pool shuffled with
    `config.data_seed` gives the first `train_size` rows to train and the next `val_size`
    to validation; the test pool is shuffled by a random stream of its own. Columns: text,
    label (int64), review_id and rating where the source has them, source_index (row in
    the full split)."""
    try:
        full = load_full_splits(config.data, paths.cache_dir)
    except UnreadableData as err:
        from tasks.validate import refuse_unreadable

        refuse_unreadable(paths, str(err))  # validation.json says why, then it raises
    texts = normalised_texts(config.data, paths.cache_dir)
    if texts is None or any(len(texts[s]) != len(full[s]) for s in SOURCE_SPLITS):
        texts = {s: full[s]["text"].map(lambda t: normalise_text(t) if isinstance(t, str) else t)
                 for s in SOURCE_SPLITS}
    pools, removed = unique_pools(texts)
    need = {"train": config.train_size + config.val_size, "test": config.test_size}
    for split, rows in need.items():
        if rows > len(pools[split]):
            what = ("train_size + val_size" if split == "train" else "test_size")
            raise ValueError(f"{what} = {rows:,} but the {split} split of {config.data!r} has "
                             f"{len(pools[split]):,} distinct reviews ({len(full[split]):,} rows)")
    train_order = pools["train"][shuffled(len(pools["train"]), config.data_seed)]
    test_order = pools["test"][shuffled(len(pools["test"]), (config.data_seed, TEST_STREAM))]
    orders = {"train": train_order[:config.train_size],
              "validation": train_order[config.train_size:need["train"]],
              "test": test_order[:config.test_size]}
    written = {}
    for split, order in orders.items():
        source = "test" if split == "test" else "train"
        subset = full[source].iloc[order].reset_index(drop=True)
        subset["text"] = texts[source].iloc[order].to_numpy()
        subset["source_index"] = order.astype("int64")
        target = paths.split_parquet(split)
        with atomic_path(target) as tmp:
            subset.to_parquet(tmp, index=False)
        written[split] = str(target)
        log.info("%s: %d of %d distinct reviews -> %s", split, len(subset), len(pools[source]),
                 target)
    write_json(paths.data_dir / "draw.json", {
        "normalisation": "markup such as <br /> removed, whitespace collapsed (tasks.text)",
        "deduplication": removed, "data_seed": config.data_seed,
        "test_stream": f"numpy default_rng(({config.data_seed}, {TEST_STREAM}))"})
    return written


def unique_pools(texts: dict[str, pd.Series]) -> tuple[dict[str, np.ndarray], dict[str, Any]]:
    """Row indices of each split whose normalised text was not seen before (training split
    first, then test), and how many rows were removed and why."""
    seen: set[str] = set()
    pools, removed = {}, {}
    for split in SOURCE_SPLITS:
        keep, within, earlier = [], 0, 0
        here: set[str] = set()
        for i, text in enumerate(texts[split].tolist()):
            if text in here:
                within += 1
            elif text in seen:
                earlier += 1
            else:
                keep.append(i)
            here.add(text)
        seen |= here
        pools[split] = np.asarray(keep, dtype=np.int64)
        removed[split] = {"rows": len(texts[split]), "kept": len(keep),
                          "duplicates_within_split": within,
                          "also_in_an_earlier_split": earlier}
    return pools, removed


def shuffled(rows: int, seed: int | tuple[int, ...]) -> np.ndarray:
    """A permutation of `rows` from `np.random.default_rng(seed)` (`datasets`'
    `Dataset.shuffle(seed=...)` draws its order the same way)."""
    return np.random.default_rng(seed).permutation(rows)
