"""MetricsRecord: scores, the three ways a variant ends, and reading back stored records
(hand-edited ones included) without crashing."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from tasks.metrics import STATUSES, MetricsRecord, classification_scores, write_predictions
from tasks.paths import read_json
from tasks.registry import Variant

LORA = Variant("lora", rank=4, targets="qkvo", lr=2e-3, seed=42)


def test_scores_match_hand_computed_values():
    labels = np.array([1, 1, 0, 0, 1])
    preds = np.array([1, 0, 0, 1, 1])
    scores = classification_scores(labels, preds)
    assert scores["accuracy"] == pytest.approx(0.6)
    assert scores["f1"] == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))
    assert scores["confusion_matrix"] == [[1, 1], [1, 2]]
    assert scores["examples"] == 5
    low, high = scores["accuracy_ci95"]
    assert 0.0 <= low <= 0.6 <= high <= 1.0


def test_scores_refuse_mismatched_or_empty_input():
    with pytest.raises(ValueError, match="equally many"):
        classification_scores(np.array([1, 0]), np.array([1]))
    with pytest.raises(ValueError, match="equally many"):
        classification_scores(np.array([]), np.array([]))


def test_bootstrap_interval_narrows_with_more_examples():
    rng = np.random.default_rng(0)
    small = rng.integers(0, 2, 50)
    big = rng.integers(0, 2, 5000)

    def width(x):
        return np.diff(classification_scores(x, np.ones_like(x))["accuracy_ci95"])[0]

    assert width(big) < width(small) / 4


def test_start_takes_the_variants_dimensions():
    record = MetricsRecord.start(LORA, "tiny-distilbert", "smoke", {"batch_size": 16})
    assert (record.variant, record.method, record.rank, record.targets, record.lr,
            record.seed) == (LORA.name, "lora", 4, "qkvo", 2e-3, 42)
    assert record.status == "running" and record.hyperparameters == {"batch_size": 16}
    assert record.started_at and record.finished_at is None


def test_finish_scores_validation_and_test_and_writes_predictions_then_the_record(smoke_run):
    _, paths = smoke_run
    record = MetricsRecord.start(Variant("majority"), "m", "smoke")
    path = record.finish(paths, (np.array([1, 1, 0, 0]), np.array([0.9, 0.2, 0.1, 0.6])),
                         (np.array([0, 1, 1]), np.array([0.2, 0.7, 0.4])))
    assert path == paths.variant_dir("majority") / "metrics.json"
    stored = read_json(path)
    assert stored["status"] == "ok" and stored["finished_at"]
    assert stored["accuracy"] == pytest.approx(2 / 3) and stored["test_examples"] == 3
    assert stored["validation_accuracy"] == pytest.approx(0.5)
    assert stored["validation_examples"] == 4
    assert stored["confusion_matrix"] == [[1, 0], [1, 1]]
    assert "problems" not in stored  # computed when read, never stored
    preds = pd.read_parquet(paths.variant_dir("majority") / "predictions.parquet")
    assert list(preds.columns) == ["row", "label", "pred", "prob_positive"]
    assert preds["row"].tolist() == [0, 1, 2] and preds["pred"].tolist() == [0, 1, 0]


def test_failed_record_keeps_the_error_and_traceback(smoke_run):
    _, paths = smoke_run
    record = MetricsRecord.start(LORA, "m", "smoke")
    try:
        raise ValueError("target 'x' matched no module")
    except ValueError as err:
        record.fail(paths, err)
    stored = read_json(paths.variant_dir(LORA.name) / "metrics.json")
    assert stored["status"] == "failed" and stored["finished_at"]
    assert stored["error"] == "ValueError: target 'x' matched no module"
    assert "Traceback" in stored["traceback"] and stored["accuracy"] is None


def test_not_applicable_record_keeps_the_reason(smoke_run):
    _, paths = smoke_run
    record = MetricsRecord.start(Variant("seed_heuristic"), "m", "smoke")
    record.not_applicable(paths, "random weights")
    stored = MetricsRecord.read(paths.variant_dir("seed_heuristic") / "metrics.json")
    assert stored.status == "not_applicable" and stored.reason == "random weights"
    assert stored.problems == [] and not stored.ok


def test_record_round_trips_through_dict_and_file(smoke_run):
    _, paths = smoke_run
    record = MetricsRecord.start(LORA, "tiny-distilbert", "smoke", {"lr": 2e-3})
    record.accuracy, record.accuracy_ci95 = 0.75, [0.6, 0.9]
    record.latency_ms = {"base": 1.0, "unmerged": 1.5, "merged": 1.1}
    record.eval_history = [{"epoch": 1, "accuracy": 0.7, "f1": 0.7, "loss": 0.6}]
    record.details["lora_modules"] = ["a", "b"]
    record.status = "ok"
    assert MetricsRecord.from_dict(record.to_dict()) == record
    assert MetricsRecord.from_dict(json.loads(json.dumps(record.to_dict()))) == record
    assert MetricsRecord.read(record.write(paths)) == record


def test_hand_edited_record_is_read_with_its_problems_listed(tmp_path):
    stored = MetricsRecord.start(LORA, "m", "smoke").to_dict()
    del stored["variant"]
    stored.update(accuracy="high", seed="42", status="done", eval_history={"epoch": 1},
                  my_note="kept")
    path = tmp_path / "metrics.json"
    path.write_text(json.dumps(stored))
    record = MetricsRecord.read(path)
    text = " | ".join(record.problems)
    assert "metrics.json lacks variant" in text
    assert "accuracy should be" in text and "'high'" in text
    assert "seed should be" in text and "eval_history should be" in text
    assert "unknown status 'done'" in text
    assert len(record.problems) == 5
    assert record.status == "failed" and record.error == "the record's status is unreadable"
    assert record.variant == "unknown" and record.accuracy is None and record.seed is None
    assert record.eval_history == [] and record.details == {"my_note": "kept"}


def test_a_record_missing_every_field_is_still_read(tmp_path):
    (tmp_path / "metrics.json").write_text("{}")
    record = MetricsRecord.read(tmp_path / "metrics.json")
    assert {"metrics.json lacks variant", "metrics.json lacks method", "metrics.json lacks model",
            "metrics.json lacks preset"} <= set(record.problems)
    assert "metrics.json: unknown status None" in record.problems
    assert record.status == "failed"  # no status: never taken for a running or finished one


def test_booleans_and_non_finite_numbers_are_wrong_types():
    record = MetricsRecord.from_dict({"variant": "majority", "method": "majority", "model": "m",
                                      "preset": "smoke", "status": "ok", "accuracy": True,
                                      "f1": float("nan"), "params_total": 1.5})
    assert record.accuracy is None and record.f1 is None and record.params_total is None
    assert len(record.problems) == 3


@pytest.mark.parametrize("text", ["[1, 2]", '"ok"', "{broken"])
def test_a_file_that_is_no_json_object_raises_value_error_naming_it(tmp_path, text):
    path = tmp_path / "metrics.json"
    path.write_text(text)
    with pytest.raises(ValueError, match="metrics.json"):
        MetricsRecord.read(path)


def test_statuses_are_the_documented_ones():
    assert STATUSES == ("running", "ok", "failed", "not_applicable")


def test_write_predictions_one_row_per_test_row(tmp_path):
    path = write_predictions(tmp_path / "p.parquet", np.array([1, 0, 1, 0]),
                             np.array([0.5, 0.49, 0.99, 0.0]))
    frame = pd.read_parquet(path)
    assert frame["row"].tolist() == [0, 1, 2, 3]
    assert frame["pred"].tolist() == [1, 0, 1, 0]  # prob >= 0.5 is positive
    assert frame["label"].dtype == np.int64 and frame["prob_positive"].dtype == np.float64
