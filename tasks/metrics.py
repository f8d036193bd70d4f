"""The metrics record every baseline and training variant writes (design.md, "The metrics
record"), the classification scores in it, and the predictions file beside it."""

from __future__ import annotations

import platform
import traceback
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import ExperimentConfig
from tasks.paths import RunPaths, atomic_path, write_json

METHODS = ("baseline", "lora", "full_finetune", "linear_probe")
REQUIRED_FIELDS = (
    "variant", "method", "model", "preset", "seed", "hyperparameters", "params_total",
    "params_trainable", "accuracy", "f1", "accuracy_ci95", "eval_history", "loss_history",
    "train_seconds", "samples_per_second", "peak_memory_bytes", "device", "artifact_bytes",
    "inference_ms_per_example", "started_at", "finished_at", "status",
)


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


def new_record(variant: str, method: str, config: ExperimentConfig, seed: int | None,
               hyperparameters: dict[str, Any] | None = None) -> dict[str, Any]:
    """A record with every required field present; unmeasured numbers stay None."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of {METHODS}")
    record: dict[str, Any] = {k: None for k in REQUIRED_FIELDS}
    record.update(
        variant=variant, method=method, model=config.model, preset=config.preset, seed=seed,
        hyperparameters=hyperparameters or {}, eval_history=[], loss_history=[],
        started_at=now_iso(), status="running", device="cpu", host=platform.node(),
    )
    return record


def bootstrap_accuracy_ci(correct: np.ndarray, n_boot: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile interval of accuracy, resampling test examples with replacement."""
    correct = np.asarray(correct, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(correct), size=(n_boot, len(correct)))
    means = correct[idx].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def classification_scores(labels: np.ndarray, preds: np.ndarray) -> dict[str, Any]:
    """Accuracy, F1 of the positive class, its 95% bootstrap interval and the confusion
    matrix [[tn, fp], [fn, tp]]."""
    from sklearn.metrics import confusion_matrix, f1_score

    labels, preds = np.asarray(labels), np.asarray(preds)
    if len(labels) == 0 or len(labels) != len(preds):
        raise ValueError(f"need equally many labels and predictions, got {len(labels)} and {len(preds)}")
    correct = labels == preds
    return {
        "accuracy": float(correct.mean()),
        "f1": float(f1_score(labels, preds, zero_division=0)),
        "accuracy_ci95": bootstrap_accuracy_ci(correct),
        "confusion_matrix": confusion_matrix(labels, preds, labels=[0, 1]).tolist(),
        "test_examples": len(labels),
    }


def write_predictions(path: Path, labels: np.ndarray, prob_positive: np.ndarray) -> Path:
    """`predictions.parquet`: one row per test row (`row`, `label`, `pred`, `prob_positive`)."""
    import pandas as pd

    prob = np.asarray(prob_positive, dtype=np.float64)
    frame = pd.DataFrame({
        "row": np.arange(len(prob), dtype=np.int64),
        "label": np.asarray(labels, dtype=np.int64),
        "pred": (prob >= 0.5).astype(np.int64),
        "prob_positive": prob,
    })
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return path


def finish_record(record: dict[str, Any], labels: np.ndarray, prob_positive: np.ndarray,
                  paths: RunPaths) -> Path:
    """Score the predictions, write predictions.parquet then metrics.json (last, so a
    metrics.json with status ok always has its predictions beside it)."""
    out = paths.variant_dir(record["variant"])
    prob = np.asarray(prob_positive, dtype=np.float64)
    record.update(classification_scores(labels, (prob >= 0.5).astype(np.int64)))
    write_predictions(out / "predictions.parquet", labels, prob)
    record.update(status="ok", finished_at=now_iso())
    return write_json(out / "metrics.json", record)


def fail_record(record: dict[str, Any], error: BaseException, paths: RunPaths) -> Path:
    """Record a failed variant so the report can show it with its error."""
    record.update(status="failed", finished_at=now_iso(),
                  error=f"{type(error).__name__}: {error}",
                  traceback="".join(traceback.format_exception(error))[-4000:])
    return write_json(paths.variant_dir(record["variant"]) / "metrics.json", record)
