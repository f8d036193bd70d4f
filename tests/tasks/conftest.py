"""Fixtures for the step tests."""

from __future__ import annotations

import pandas as pd
import pytest

from tasks.paths import RunPaths


def write_run_data(paths: RunPaths, sample: dict[str, pd.DataFrame]) -> None:
    """What the download step would write: the run's data/{train,test}.parquet."""
    paths.data_dir.mkdir(parents=True, exist_ok=True)
    sample["train"].to_parquet(paths.train_parquet, index=False)
    sample["test"].to_parquet(paths.test_parquet, index=False)


@pytest.fixture
def run(smoke_run, imdb_sample):
    """A prepared smoke run (tiny-distilbert, max_length 32) with real IMDB data written."""
    config, paths = smoke_run
    write_run_data(paths, imdb_sample)
    return config, paths
