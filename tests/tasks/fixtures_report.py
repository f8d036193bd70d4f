"""Fixture runs for the report tests: stored files only, written the way the steps write
them (MetricsRecord.start / finish / fail, write_predictions, config.to_dict), names from
Variant(...).name. The numbers are test inputs chosen so the expected headline can be
worked out by hand.

200 test reviews and 100 validation reviews, labels alternating 0, 1. In the default run
full fine-tuning is wrong on test rows 0-29 (85.0%), LoRA r=4 qkvo on rows 8-41 (83.0%),
so LoRA is right where full FT is wrong on rows 0-7 (b = 8) and wrong where full FT is
right on rows 30-41 (c = 12): 20 discordant pairs, McNemar's exact binomial test.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tasks import registry
from tasks.config import preset_config
from tasks.metrics import MetricsRecord
from tasks.paths import RunPaths, write_json
from tasks.registry import Variant
from tasks.text import input_budget

N_TEST = 200
N_VAL = 100
LABELS = np.arange(N_TEST, dtype=np.int64) % 2
VAL_LABELS = np.arange(N_VAL, dtype=np.int64) % 2
XSS = "<script>alert(1)</script>"
IMG = "<img src=x onerror=alert(1)>"
FULL_WRONG = range(30)
LORA_WRONG = range(8, 42)
SEED_NOTES = (
    "sign of the summed [CLS] embedding of an untrained head: not a classifier, "
    "kept to show what the notebook's 'zero-shot' number measured"
)
STARTED, FINISHED = "2026-11-20T09:00:00+00:00", "2026-11-20T10:00:00+00:00"

# the default run: smoke preset with a rank x target-set sweep (variant names are its own)
SWEEP = {"ranks": (4, 8), "targets": ("qkvo", "qv")}
LORA_LR, FULL_LR = 2e-3, 5e-4  # the smoke preset's


def lora(rank: int = 4, targets: str = "qkvo", seed: int = 42, lr: float = LORA_LR) -> Variant:
    return Variant("lora", rank=rank, targets=targets, lr=lr, seed=seed)


def full(seed: int = 42, lr: float = FULL_LR) -> Variant:
    return Variant("full_finetune", lr=lr, seed=seed)


LORA_A = lora(4, "qkvo")  # selected on validation
LORA_B = lora(8, "qkvo")  # lower validation accuracy
FAILED = lora(8, "qv")  # stored as failed
NOT_RUN = lora(4, "qv")  # asked for by the config, never started
FULL = full()
FAILED_ERROR = f"CUDA out of memory while training {XSS}"


@dataclass
class Stored:
    """One stored variant: which test / validation rows it gets wrong (or a constant
    prediction), extra record fields, or a failure."""

    variant: Variant
    test_wrong: range | list[int] = ()
    val_wrong: range | list[int] = ()
    constant: int | None = None
    fields: dict[str, Any] = field(default_factory=dict)
    error: str | None = None  # stored as failed with this error


def _preds(labels: np.ndarray, wrong, constant: int | None) -> np.ndarray:
    if constant is not None:
        return np.full(len(labels), constant, dtype=np.int64)
    preds = labels.copy()
    idx = list(wrong)
    preds[idx] = 1 - preds[idx]
    return preds


def _prob(preds: np.ndarray) -> np.ndarray:
    return np.where(preds == 1, 0.9, 0.1)


def breakdown(total: int, trainable: int, lora_params: int) -> dict[str, Any]:
    return {
        "total": total, "trainable": trainable, "lora_params": lora_params,
        "attention_share": 0.25,
        "components": [
            {"component": "embeddings", "params": 2_000_000, "share": 0.5},
            {"component": "attention", "params": 1_000_000, "share": 0.25},
            {"component": "ffn", "params": 990_000, "share": 0.2475},
            {"component": "head", "params": 10_000, "share": 0.0025},
        ],
        "matrices": [
            {"module": f"distilbert.transformer.layer.{i}.attention.{m}", "shape": [64, 64],
             "full_params": 4096, "lora_params": 512, "reduction": 8.0}
            for i in range(2) for m in ("q_lin", "k_lin", "v_lin", "out_lin")
        ],
    }


def trained_fields(steps: int, loss0: float, seconds_per_step: float, acc: float) -> dict[str, Any]:
    return {
        "loss_history": [{"step": s + 1, "epoch": 1, "loss": loss0 * (0.98**s), "lr": 1e-3}
                         for s in range(steps)],
        "train_steps": steps, "seconds_per_step": seconds_per_step,
        "train_seconds": steps * seconds_per_step, "samples_per_second": 16 / seconds_per_step,
        "eval_history": [{"epoch": 1, "accuracy": acc - 0.02, "f1": acc, "loss": 0.5},
                         {"epoch": 2, "accuracy": acc, "f1": acc, "loss": 0.4}],
        "device": "cpu", "precision": "fp32",
    }


def lora_fields(acc: float = 0.84, trainable: int = 36_000) -> dict[str, Any]:
    return {
        "params_total": 4_000_000, "params_trainable": trainable,
        "peak_memory_bytes": 350_000_000, "artifact_bytes": 150_000,
        "inference_ms_per_example": 2.1,
        "latency_ms": {"base": 2.0, "unmerged": 2.6, "merged": 2.1},
        "parameter_breakdown": breakdown(4_000_000, trainable, 4096),
        **trained_fields(40, 0.70, 0.10, acc),
    }


def full_fields(acc: float = 0.86) -> dict[str, Any]:
    return {
        "params_total": 4_000_000, "params_trainable": 4_000_000,
        "peak_memory_bytes": 520_000_000, "artifact_bytes": 16_000_000,
        "inference_ms_per_example": 2.0,
        "parameter_breakdown": breakdown(4_000_000, 4_000_000, 0),
        **trained_fields(40, 0.69, 0.14, acc),
    }


def majority() -> Stored:
    return Stored(Variant("majority"), constant=1, fields={
        "params_total": 1, "params_trainable": 1, "train_seconds": 0.001,
        "inference_ms_per_example": 0.0})


def tfidf(test_wrong=range(40), val_wrong=range(22)) -> Stored:
    return Stored(Variant("tfidf_logreg"), test_wrong, val_wrong, fields={
        "params_total": 20_001, "params_trainable": 20_001, "train_seconds": 2.5,
        "inference_ms_per_example": 0.05, "artifact_bytes": 160_000,
        "samples_per_second": 800.0})


def seed_heuristic() -> Stored:
    return Stored(Variant("seed_heuristic"), range(96), range(50), fields={
        "params_total": 4_000_000, "params_trainable": 0, "notes": SEED_NOTES,
        "inference_ms_per_example": 3.2})


def default_variants() -> list[Stored]:
    """Validation: LoRA A 84%, LoRA B 82%, full FT 86%; test: 83%, 80%, 85%."""
    return [
        majority(), tfidf(), seed_heuristic(),
        Stored(LORA_A, LORA_WRONG, range(16), fields=lora_fields(0.84)),
        Stored(LORA_B, range(40), range(18), fields=lora_fields(0.82, trainable=72_000)),
        Stored(FAILED, error=FAILED_ERROR),
        Stored(FULL, FULL_WRONG, range(14), fields=full_fields(0.86)),
    ]


def make_run(
    root: Path,
    run_id: str = "fixture-run",
    variants: list[Stored] | None = None,
    finished_at: str = FINISHED,
    validation: bool = True,
    tokens: bool = True,
    **config_overrides: Any,
) -> RunPaths:
    """A run folder under <root>/artifacts/runs/<run_id> with `variants` stored (default:
    the default run, whose config sweeps ranks (4, 8) x targets (qkvo, qv)). The config
    asks for the stored variants' methods unless `methods` is given, so methods added to
    the registry later do not turn up here as "not run"."""
    if variants is None:
        variants = default_variants()
        config_overrides = {**SWEEP, **config_overrides}
    if "methods" not in config_overrides:
        stored = {s.variant.method for s in variants}
        config_overrides["methods"] = tuple(m for m in registry.METHODS if m in stored)
    config = preset_config("smoke", data="x", **config_overrides)
    paths = RunPaths.for_run(run_id, root / "artifacts", root / "reports")
    write_json(paths.config_json, config.to_dict())
    if validation:
        write_json(paths.validation_json, validation_record())
    if tokens:
        write_json(paths.tokens_json, tokens_record())
    for stored in variants:
        write_variant(paths, config, stored, finished_at)
    return paths


def write_variant(paths: RunPaths, config, stored: Stored, finished_at: str = FINISHED) -> None:
    record = MetricsRecord.start(stored.variant, config.model, config.preset,
                                 {"lr": stored.variant.lr} if stored.variant.lr else {})
    record.input_budget = input_budget(registry.method(stored.variant.method).reads,
                                       tokens_record())
    for key, value in stored.fields.items():
        setattr(record, key, value)
    if stored.error is not None:
        try:
            raise RuntimeError(stored.error)
        except RuntimeError as err:
            record.fail(paths, err)
    else:
        record.finish(paths,
                      (VAL_LABELS, _prob(_preds(VAL_LABELS, stored.val_wrong, stored.constant))),
                      (LABELS, _prob(_preds(LABELS, stored.test_wrong, stored.constant))))
    record.started_at, record.finished_at, record.host = STARTED, finished_at, "fixture-host"
    record.write(paths)


def validation_record() -> dict[str, Any]:
    return {
        "success": True,
        "rows": {"train": 256, "validation": 100, "test": 200},
        "class_balance": {"train": {"0": 128, "1": 128}, "validation": {"0": 50, "1": 50},
                          "test": {"0": 100, "1": 100}},
        "expectations": [
            {"split": "train", "expectation": "expect_column_values_to_not_be_null",
             "column": "text", "kwargs": {"column": "text"}, "success": True,
             "observed_value": None, "unexpected_count": 0, "unexpected_percent": 0.0},
            {"split": "validation", "expectation": "expect_column_values_to_be_in_set",
             "column": "label", "kwargs": {"column": "label", "value_set": [0, 1]},
             "success": True, "observed_value": f"a review with <br /> and {XSS}",
             "unexpected_count": 0, "unexpected_percent": 0.0},
            {"split": "test", "expectation": "expect_table_row_count_to_be_between",
             "column": None, "kwargs": {"min_value": 200}, "success": False,
             "observed_value": 199, "unexpected_count": None, "unexpected_percent": None},
        ],
        "statistics": {"evaluated_expectations": 3},
        "validated_at": "2026-11-20T08:59:00+00:00",
        "gx_version": "1.24.1",
    }


def tokens_record() -> dict[str, Any]:
    edges = [0, 64, 128, 192, 256, 320, 384, 448, 512]

    def split(counts: list[int], truncated: float) -> dict[str, Any]:
        return {"count": sum(counts), "mean": 180.5, "median": 150.0, "p95": 420.0, "max": 512,
                "truncated_share": truncated, "mean_share_read": 0.6,
                "histogram": {"bin_edges": edges, "counts": counts}}

    return {
        "key": "abc123", "cache_dir": "/tmp/cache/abc123", "model": "tiny-distilbert",
        "tokenizer": {"name": "tiny-distilbert", "vocab_sha256": "0f0f", "class": "BertTokenizerFast"},
        "max_length": 64, "truncation": "head", "cache_hit": False,
        "truncation_settings": {"strategy": "head", "head_tokens": 62, "tail_tokens": 0},
        "stats": {
            "train": split([10, 60, 70, 50, 30, 20, 10, 6], 0.96),
            "validation": split([2, 10, 20, 30, 20, 10, 5, 3], 0.95),
            "test": split([8, 50, 55, 40, 22, 15, 6, 4], 0.955),
        },
    }
