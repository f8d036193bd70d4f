"""The metrics record every variant writes (`results/<variant>/metrics.json`), the
classification scores in it, and the predictions file beside it.

`MetricsRecord` is the one writer and the one reader of metrics.json: steps fill it in
and `write` it; the report `read`s it back, with whatever is missing or malformed listed
in `problems` instead of breaking the page. Numbers that were not measured stay None.
"""

from __future__ import annotations

import dataclasses
import math
import platform
import re
import traceback
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from tasks.paths import RunPaths, atomic_path, read_json, write_json
from tasks.registry import Variant

STATUSES = ("running", "ok", "failed", "not_applicable")


def now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="seconds")


@dataclass
class MetricsRecord:
    variant: str
    method: str
    model: str
    preset: str
    seed: int | None = None
    rank: int | None = None
    targets: str | None = None
    lr: float | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)  # settings and choices
    status: str = "running"
    error: str | None = None  # failed: what went wrong
    traceback: str | None = None
    reason: str | None = None  # not_applicable: why the method cannot run on this model
    notes: str | None = None  # what the number means, for the report
    # scores: `accuracy`/`f1` are the test subset, scored once for the final model
    accuracy: float | None = None
    f1: float | None = None
    accuracy_ci95: list[float] | None = None  # bootstrap over test examples
    confusion_matrix: list[list[int]] | None = None  # [[tn, fp], [fn, tp]]
    test_examples: int | None = None
    validation_accuracy: float | None = None  # every choice is made on these
    validation_f1: float | None = None
    validation_examples: int | None = None
    validation_loss: float | None = None  # log loss of P(positive): breaks accuracy ties
    input_budget: dict[str, Any] | None = None  # what of a review it read (tasks.text)
    eval_history: list[dict[str, Any]] = field(default_factory=list)  # per epoch, validation
    loss_history: list[dict[str, Any]] = field(default_factory=list)  # per optimizer step
    # cost
    params_total: int | None = None
    params_trainable: int | None = None
    parameter_breakdown: dict[str, Any] | None = None
    train_seconds: float | None = None
    train_steps: int | None = None
    seconds_per_step: float | None = None
    samples_per_second: float | None = None
    eval_seconds: float | None = None
    peak_memory_bytes: int | None = None
    peak_memory_kind: str | None = None
    artifact_bytes: int | None = None
    inference_ms_per_example: float | None = None  # batch 1; merged model for LoRA
    latency_ms: dict[str, float] | None = None  # mergeable methods: base/unmerged/merged
    latency_protocol: dict[str, Any] | None = None
    precision: str | None = None
    resumed_from_epoch: int | None = None
    device: str = "cpu"
    host: str = field(default_factory=platform.node)
    # where it ran: commit, torch/CUDA/transformers, device name, host, precision used
    provenance: dict[str, Any] | None = None
    attempt: int = 1  # the try that wrote this record: Airflow's try number, 1 for the CLI
    started_at: str = field(default_factory=now_iso)
    finished_at: str | None = None
    details: dict[str, Any] = field(default_factory=dict)  # method-specific measurements
    problems: list[str] = field(default_factory=list, metadata={"stored": False})

    @classmethod
    def start(cls, variant: Variant, model: str, preset: str,
              hyperparameters: dict[str, Any] | None = None) -> MetricsRecord:
        return cls(variant=variant.name, method=variant.method, model=model, preset=preset,
                   seed=variant.seed, rank=variant.rank, targets=variant.targets, lr=variant.lr,
                   hyperparameters=dict(hyperparameters or {}))

    @property
    def ok(self) -> bool:
        return self.status == "ok"

    def to_dict(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if f.metadata.get("stored", True)}

    def write(self, paths: RunPaths) -> Path:
        return write_json(paths.variant_dir(self.variant) / "metrics.json", self.to_dict())

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> MetricsRecord:
        """A record from stored JSON: unknown keys go to `details`, missing or mistyped
        ones become defaults, and each such defect is listed in `problems`."""
        problems, values = [], {}
        stored = {f.name: f for f in dataclasses.fields(cls) if f.metadata.get("stored", True)}
        for name, f in stored.items():
            if name not in data:
                if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
                    problems.append(f"metrics.json lacks {name}")
                continue
            value = data[name]
            if value is not None and not _fits(value, f.type):
                problems.append(f"metrics.json: {name} should be {f.type}, got {value!r:.60}")
                continue
            values[name] = value
        extra = {k: v for k, v in data.items() if k not in stored}
        values.setdefault("details", {})
        values["details"] = {**values["details"], **extra}
        for name in ("variant", "method", "model", "preset"):
            values.setdefault(name, "unknown")
        if values.get("status") not in STATUSES:
            problems.append(f"metrics.json: unknown status {values.get('status')!r}")
            values["status"] = "failed"
            values["error"] = values.get("error") or "the record's status is unreadable"
        return cls(**values, problems=problems)

    @classmethod
    def read(cls, path: Path) -> MetricsRecord:
        """Read a stored record; raises OSError or ValueError if it is not a JSON object."""
        data = read_json(path)
        if not isinstance(data, dict):
            raise ValueError(f"{path} holds {type(data).__name__}, not a JSON object")
        return cls.from_dict(data)

    # --- the three ways a variant ends ---------------------------------------------------

    def finish(self, paths: RunPaths, validation: tuple[np.ndarray, np.ndarray],
               test: tuple[np.ndarray, np.ndarray]) -> Path:
        """Score (labels, P(positive)) of validation and test, write predictions.parquet
        then metrics.json (last: a metrics.json with status ok has its predictions)."""
        val_scores = classification_scores(validation[0], predicted(validation[1]))
        self.validation_accuracy = val_scores["accuracy"]
        self.validation_f1 = val_scores["f1"]
        self.validation_examples = val_scores["examples"]
        self.validation_loss = log_loss(*validation)
        scores = classification_scores(test[0], predicted(test[1]))
        self.accuracy, self.f1 = scores["accuracy"], scores["f1"]
        self.accuracy_ci95 = scores["accuracy_ci95"]
        self.confusion_matrix = scores["confusion_matrix"]
        self.test_examples = scores["examples"]
        write_predictions(paths.variant_dir(self.variant) / "predictions.parquet", *test)
        self.status, self.finished_at = "ok", now_iso()
        return self.write(paths)

    def fail(self, paths: RunPaths, error: BaseException) -> Path:
        self.status, self.finished_at = "failed", now_iso()
        self.error = f"{type(error).__name__}: {error}"
        self.traceback = "".join(traceback.format_exception(error))[-4000:]
        return self.write(paths)

    def not_applicable(self, paths: RunPaths, reason: str) -> Path:
        self.status, self.finished_at, self.reason = "not_applicable", now_iso(), reason
        return self.write(paths)


def _fits(value: Any, annotation: str) -> bool:
    """A loose check of a stored value against the outer type of a field's annotation
    (`list[float] | None` -> list)."""
    kinds = {k.strip() for k in re.sub(r"\[.*?\]+", "", annotation).split("|")}
    if isinstance(value, bool):
        return "bool" in kinds
    checks = {"int": lambda v: isinstance(v, int),
              "float": lambda v: isinstance(v, (int, float)) and math.isfinite(v),
              "str": lambda v: isinstance(v, str), "dict": lambda v: isinstance(v, dict),
              "list": lambda v: isinstance(v, list)}
    return any(checks[k](value) for k in kinds if k in checks)


# --- scores and predictions ------------------------------------------------------------------

def predicted(prob_positive: np.ndarray) -> np.ndarray:
    return (np.asarray(prob_positive, dtype=np.float64) >= 0.5).astype(np.int64)


def log_loss(labels: np.ndarray, prob_positive: np.ndarray) -> float:
    """Mean binary cross-entropy, probabilities clipped to [1e-7, 1 - 1e-7] (a hard 0/1
    baseline gets a large but finite loss)."""
    y = np.asarray(labels, dtype=np.float64)
    p = np.clip(np.asarray(prob_positive, dtype=np.float64), 1e-7, 1 - 1e-7)
    return float(-np.mean(y * np.log(p) + (1 - y) * np.log(1 - p)))


def bootstrap_accuracy_ci(correct: np.ndarray, n_boot: int = 1000, seed: int = 0) -> list[float]:
    """95% percentile interval of accuracy, resampling examples with replacement."""
    correct = np.asarray(correct, dtype=np.float64)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(correct), size=(n_boot, len(correct)))
    means = correct[idx].mean(axis=1)
    return [float(np.percentile(means, 2.5)), float(np.percentile(means, 97.5))]


def classification_scores(labels: np.ndarray, preds: np.ndarray) -> dict[str, Any]:
    """Accuracy, F1 of the positive class, its 95% bootstrap interval, the confusion
    matrix [[tn, fp], [fn, tp]] and the number of examples."""
    from sklearn.metrics import confusion_matrix, f1_score

    labels, preds = np.asarray(labels), np.asarray(preds)
    if len(labels) == 0 or len(labels) != len(preds):
        raise ValueError(f"need equally many labels and predictions, got {len(labels)} and "
                         f"{len(preds)}")
    correct = labels == preds
    return {
        "accuracy": float(correct.mean()),
        "f1": float(f1_score(labels, preds, zero_division=0)),
        "accuracy_ci95": bootstrap_accuracy_ci(correct),
        "confusion_matrix": confusion_matrix(labels, preds, labels=[0, 1]).tolist(),
        "examples": len(labels),
    }


def write_predictions(path: Path, labels: np.ndarray, prob_positive: np.ndarray) -> Path:
    """`predictions.parquet`: one row per test row (`row`, `label`, `pred`, `prob_positive`)."""
    import pandas as pd

    prob = np.asarray(prob_positive, dtype=np.float64)
    frame = pd.DataFrame({
        "row": np.arange(len(prob), dtype=np.int64),
        "label": np.asarray(labels, dtype=np.int64),
        "pred": predicted(prob),
        "prob_positive": prob,
    })
    with atomic_path(path) as tmp:
        frame.to_parquet(tmp, index=False)
    return path
