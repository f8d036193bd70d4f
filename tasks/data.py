"""Step 1: fetch IMDB and write the run's deterministic train/validation/test subsets.

The source (hub, an aclImdb archive's URL, a local folder) is tasks.sources': its two
normalised full splits, cached once per source. The training and test subsets are the seed
notebook's, `dataset.shuffle(seed=42).select(range(n))`; validation takes the training
split's next rows in the same order, so it never overlaps the training subset.
"""

from __future__ import annotations

import logging

import numpy as np

from tasks.config import ExperimentConfig
from tasks.paths import RunPaths, atomic_path
from tasks.sources import UnreadableData, load_full_splits

log = logging.getLogger(__name__)


def download_dataset(config: ExperimentConfig, paths: RunPaths) -> dict[str, str]:
    """Write the run's three subsets, `data/{train,validation,test}.parquet`: the training
    split shuffled with `config.data_seed` gives the first `train_size` rows to train and
    the next `val_size` to validation (disjoint by construction); the test split shuffled
    the same way gives the first `test_size`. Columns: text, label (int64), review_id and
    rating where the source has them, source_index (row in the full split)."""
    try:
        full = load_full_splits(config.data, paths.cache_dir)
    except UnreadableData as err:
        from tasks.validate import refuse_unreadable

        refuse_unreadable(paths, str(err))  # validation.json says why, then it raises
    need = {"train": config.train_size + config.val_size, "test": config.test_size}
    for split, rows in need.items():
        if rows > len(full[split]):
            what = ("train_size + val_size" if split == "train" else "test_size")
            raise ValueError(f"{what} = {rows:,} but the {split} split of {config.data!r} has "
                             f"{len(full[split]):,} rows")
    train_order = shuffled(len(full["train"]), config.data_seed)
    orders = {"train": train_order[:config.train_size],
              "validation": train_order[config.train_size:need["train"]],
              "test": shuffled(len(full["test"]), config.data_seed)[:config.test_size]}
    written = {}
    for split, order in orders.items():
        source = full["test" if split == "test" else "train"]
        subset = source.iloc[order].reset_index(drop=True)
        subset["source_index"] = order.astype("int64")
        target = paths.split_parquet(split)
        with atomic_path(target) as tmp:
            subset.to_parquet(tmp, index=False)
        written[split] = str(target)
        log.info("%s: %d of %d rows -> %s", split, len(subset), len(source), target)
    return written


def shuffled(rows: int, seed: int) -> np.ndarray:
    """The row order of `datasets.Dataset.shuffle(seed=seed)`: `datasets` draws it from
    `np.random.default_rng(seed).permutation`, so the subsets match the notebook's."""
    return np.random.default_rng(seed).permutation(rows)


