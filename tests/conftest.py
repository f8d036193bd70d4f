"""Shared fixtures: the real IMDB sample, small configs and isolated run folders."""

from __future__ import annotations

import os
from pathlib import Path

import pandas as pd
import pytest

from tasks.config import preset_config
from tasks.pipeline import prepare_run

IMDB_DIR = Path(os.environ.get("LORAFLOW_DATA", Path(__file__).resolve().parents[2] / "shared/data/imdb"))

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach the hub
os.environ.setdefault("LORAFLOW_DATA", str(IMDB_DIR))  # the presets' data, as under `make test`
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GX_ANALYTICS_ENABLED", "false")
# One intra-op thread (before torch is imported, so subprocesses inherit it too): the test
# models are tiny, and on a loaded machine two spinning OpenMP threads made batch-1
# forward passes over ten times slower.
os.environ.setdefault("OMP_NUM_THREADS", "1")


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
