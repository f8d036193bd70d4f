import numpy as np
import pandas as pd
import pytest

from tasks.metrics import (
    REQUIRED_FIELDS,
    classification_scores,
    fail_record,
    finish_record,
    new_record,
)
from tasks.paths import read_json


def test_scores_match_hand_computed_values():
    labels = np.array([1, 1, 0, 0, 1])
    preds = np.array([1, 0, 0, 1, 1])
    scores = classification_scores(labels, preds)
    assert scores["accuracy"] == pytest.approx(0.6)
    assert scores["f1"] == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
    assert scores["confusion_matrix"] == [[1, 1], [1, 2]]
    low, high = scores["accuracy_ci95"]
    assert 0.0 <= low <= 0.6 <= high <= 1.0


def test_bootstrap_interval_narrows_with_more_examples():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 2, 50)
    big = rng.integers(0, 2, 5000)
    width = lambda x: np.diff(classification_scores(x, np.ones_like(x))["accuracy_ci95"])[0]
    assert width(big) < width(small) / 4


def test_finish_writes_predictions_then_a_complete_record(smoke_run):
    config, paths = smoke_run
    record = new_record("majority", "baseline", config, None)
    finish_record(record, np.array([0, 1, 1]), np.array([0.2, 0.7, 0.4]), paths)
    stored = read_json(paths.variant_dir("majority") / "metrics.json")
    assert set(REQUIRED_FIELDS) <= set(stored) and stored["status"] == "ok"
    assert stored["accuracy"] == pytest.approx(2 / 3)
    preds = pd.read_parquet(paths.variant_dir("majority") / "predictions.parquet")
    assert preds["row"].tolist() == [0, 1, 2] and preds["pred"].tolist() == [0, 1, 0]


def test_failed_record_keeps_the_error(smoke_run):
    config, paths = smoke_run
    record = new_record("lora_r4_qkvo_s42", "lora", config, 42)
    fail_record(record, ValueError("target 'x' matched no module"), paths)
    stored = read_json(paths.variant_dir("lora_r4_qkvo_s42") / "metrics.json")
    assert stored["status"] == "failed" and "matched no module" in stored["error"]


def test_unknown_method_is_refused(smoke_config):
    with pytest.raises(ValueError, match="unknown method"):
        new_record("x", "distillation", smoke_config, 0)
