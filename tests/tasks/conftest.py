"""Fixtures for the step tests."""

from __future__ import annotations

import pandas as pd
import pytest

from tasks.paths import RunPaths


def write_run_data(paths: RunPaths, sample: dict[str, pd.DataFrame]) -> None:
    """What the download step would write: the run's data/<split>.parquet for each split
    in `sample` (train, validation, test)."""
    paths.data_dir.mkdir(parents=True, exist_ok=True)
    for split, frame in sample.items():
        frame.to_parquet(paths.split_parquet(split), index=False)


@pytest.fixture
def run(smoke_run, imdb_sample):
    """A prepared smoke run (tiny-distilbert, max_length 32) with real IMDB data written."""
    config, paths = smoke_run
    write_run_data(paths, imdb_sample)
    return config, paths
