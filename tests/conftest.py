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


@pytest.fixture(scope="session")
def imdb_dir() -> Path:
    if not (IMDB_DIR / "train.parquet").exists():
        pytest.fail(f"IMDB parquet files not found in {IMDB_DIR} (set LORAFLOW_DATA)")
    return IMDB_DIR


@pytest.fixture(scope="session")
def imdb_sample(imdb_dir) -> dict[str, pd.DataFrame]:
    """400 train / 200 test real reviews, balanced, deterministic."""
    out = {}
    for split, n in (("train", 400), ("test", 200)):
        frame = pd.read_parquet(imdb_dir / f"{split}.parquet")
        out[split] = frame.sample(n=n, random_state=0).reset_index(drop=True)
    return out


@pytest.fixture
def artifacts(tmp_path, monkeypatch) -> Path:
    """Isolated artifacts and reports roots for one test."""
    monkeypatch.setenv("LORAFLOW_ARTIFACTS", str(tmp_path / "artifacts"))
    monkeypatch.setenv("LORAFLOW_REPORTS", str(tmp_path / "reports"))
    return tmp_path / "artifacts"


@pytest.fixture
def smoke_config(imdb_dir):
    """The smoke preset on the local IMDB copy, shrunk further for unit tests."""
    return preset_config("smoke", data=str(imdb_dir), train_size=64, test_size=32, max_length=32)


@pytest.fixture
def smoke_run(smoke_config, artifacts):
    """(config, paths) of a prepared smoke run in a temporary artifacts root."""
    return smoke_config, prepare_run(smoke_config, "test-run", artifacts, artifacts.parent / "reports")
