"""Fixture runs for the report tests: stored files only, written the way the steps write
them (tasks.metrics records, write_predictions, config.to_dict). The numbers are test
inputs chosen so the expected headline can be worked out by hand:

200 test reviews; full fine-tuning is wrong on rows 0-29 (85.0%), LoRA r=4 on rows 8-41
(83.0%), so LoRA is right where full FT is wrong on rows 0-7 (b = 8) and wrong where full
FT is right on rows 30-41 (c = 12): 20 discordant pairs, McNemar's exact binomial test.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from tasks.config import preset_config
from tasks.metrics import classification_scores, fail_record, new_record, write_predictions
from tasks.paths import RunPaths, write_json

N_TEST = 200
LABELS = np.arange(N_TEST, dtype=np.int64) % 2
XSS = "<script>alert(1)</script>"
FULL_WRONG = range(30)
LORA_WRONG = range(8, 42)
ALL_VARIANTS = (
    "majority",
    "tfidf_logreg",
    "seed_heuristic",
    "lora_r4_qkvo_s42",
    "full_finetune_s42",
    "lora_r8_qv_s42",
)
FAILED = "lora_r8_qv_s42"
FAILED_ERROR = f"RuntimeError: CUDA out of memory while training {XSS}"
SEED_NOTES = (
    "sign of the summed [CLS] embedding of an untrained head: not a classifier, "
    "kept to show what the notebook's 'zero-shot' number measured"
)


def _preds(wrong: range | list[int] | None = None, constant: int | None = None) -> np.ndarray:
    if constant is not None:
        return np.full(N_TEST, constant, dtype=np.int64)
    preds = LABELS.copy()
    idx = list(wrong or [])
    preds[idx] = 1 - preds[idx]
    return preds


def _breakdown(total: int, trainable: int, lora: int) -> dict[str, Any]:
    return {
        "total": total,
        "trainable": trainable,
        "lora_params": lora,
        "attention_share": 0.25,
        "components": [
            {"component": "embeddings", "params": 2_000_000, "share": 0.5},
            {"component": "attention", "params": 1_000_000, "share": 0.25},
            {"component": "ffn", "params": 990_000, "share": 0.2475},
            {"component": "head", "params": 10_000, "share": 0.0025},
        ],
        "matrices": [
            {
                "module": f"distilbert.transformer.layer.{i}.attention.{m}",
                "shape": [64, 64],
                "full_params": 4096,
                "lora_params": 512,
                "reduction": 8.0,
            }
            for i in range(2)
            for m in ("q_lin", "k_lin", "v_lin", "out_lin")
        ],
    }


def _trained_fields(
    steps: int, loss0: float, seconds_per_step: float, acc: float
) -> dict[str, Any]:
    loss = [
        {"step": s + 1, "epoch": 1, "loss": loss0 * (0.98**s), "lr": 1e-3} for s in range(steps)
    ]
    return {
        "loss_history": loss,
        "train_steps": steps,
        "seconds_per_step": seconds_per_step,
        "train_seconds": steps * seconds_per_step,
        "samples_per_second": 16 / seconds_per_step,
        "eval_history": [
            {"epoch": 1, "accuracy": acc - 0.02, "f1": acc, "loss": 0.5},
            {"epoch": 2, "accuracy": acc, "f1": acc, "loss": 0.4},
        ],
    }


def variant_specs() -> dict[str, dict[str, Any]]:
    """name -> (method, seed, predictions, extra record fields)."""
    return {
        "majority": {
            "method": "baseline",
            "seed": None,
            "preds": _preds(constant=1),
            "fields": {
                "params_total": 0,
                "params_trainable": 0,
                "train_seconds": 0.001,
                "inference_ms_per_example": 0.0001,
                "artifact_bytes": 0,
            },
        },
        "tfidf_logreg": {
            "method": "baseline",
            "seed": 42,
            "preds": _preds(range(40)),
            "fields": {
                "params_total": 20_001,
                "params_trainable": 20_001,
                "train_seconds": 2.5,
                "inference_ms_per_example": 0.05,
                "artifact_bytes": 160_000,
                "samples_per_second": 800.0,
            },
        },
        "seed_heuristic": {
            "method": "baseline",
            "seed": 42,
            "preds": _preds(range(96)),
            "fields": {
                "params_total": 4_000_000,
                "params_trainable": 0,
                "notes": SEED_NOTES,
                "inference_ms_per_example": 3.2,
            },
        },
        "lora_r4_qkvo_s42": {
            "method": "lora",
            "seed": 42,
            "preds": _preds(LORA_WRONG),
            "fields": {
                "params_total": 4_000_000,
                "params_trainable": 36_000,
                "rank": 4,
                "targets": "qkvo",
                "peak_memory_bytes": 350_000_000,
                "artifact_bytes": 150_000,
                "device": "cpu",
                "inference_ms_per_example": 2.1,
                "latency_ms": {"base": 2.0, "unmerged": 2.6, "merged": 2.1},
                "parameter_breakdown": _breakdown(4_000_000, 36_000, 4096),
                **_trained_fields(40, 0.70, 0.10, 0.83),
            },
        },
        "full_finetune_s42": {
            "method": "full_finetune",
            "seed": 42,
            "preds": _preds(FULL_WRONG),
            "fields": {
                "params_total": 4_000_000,
                "params_trainable": 4_000_000,
                "peak_memory_bytes": 520_000_000,
                "artifact_bytes": 16_000_000,
                "device": "cpu",
                "inference_ms_per_example": 2.0,
                "parameter_breakdown": _breakdown(4_000_000, 4_000_000, 0),
                **_trained_fields(40, 0.69, 0.14, 0.85),
            },
        },
    }


def make_run(
    root: Path,
    run_id: str = "fixture-run",
    variants: tuple[str, ...] = ALL_VARIANTS,
    finished_at: str = "2026-11-20T10:00:00+00:00",
    validation: bool = True,
    tokens: bool = True,
    extra: dict[str, Any] | None = None,
    **config_overrides: Any,
) -> RunPaths:
    """A run folder under <root>/artifacts/runs/<run_id> with the named variants stored."""
    config = preset_config("smoke", data="x", **config_overrides)
    if extra is not None:
        config = config.with_overrides(extra=extra)
    paths = RunPaths.for_run(run_id, root / "artifacts", root / "reports")
    write_json(paths.config_json, config.to_dict())
    if validation:
        write_json(paths.validation_json, validation_record())
    if tokens:
        write_json(paths.tokens_json, tokens_record())
    specs = variant_specs()
    for name in variants:
        if name == FAILED or name.startswith("failed"):
            _write_failed(name, config, paths, finished_at)
            continue
        spec = specs[name]
        record = new_record(name, spec["method"], config, spec["seed"], {"lr": 1e-3})
        record.update(classification_scores(LABELS, spec["preds"]))
        record.update(
            spec["fields"],
            status="ok",
            started_at="2026-11-20T09:00:00+00:00",
            finished_at=finished_at,
            host="fixture-host",
        )
        out = paths.variant_dir(name)
        write_predictions(
            out / "predictions.parquet", LABELS, np.where(spec["preds"] == 1, 0.9, 0.1)
        )
        write_json(out / "metrics.json", record)
    return paths


def _write_failed(name: str, config, paths: RunPaths, finished_at: str) -> None:
    method = "lora" if name.startswith("lora") else "full_finetune"
    record = new_record(name, method, config, 42, {"lr": 1e-3})
    try:
        raise RuntimeError(FAILED_ERROR.removeprefix("RuntimeError: "))
    except RuntimeError as err:
        fail_record(record, err, paths)
    stored = paths.variant_dir(name) / "metrics.json"
    import json

    rec = json.loads(stored.read_text())
    rec.update(started_at="2026-11-20T09:00:00+00:00", finished_at=finished_at, host="fixture-host")
    write_json(stored, rec)


def validation_record() -> dict[str, Any]:
    return {
        "success": True,
        "rows": {"train": 256, "test": 200},
        "class_balance": {"train": {"0": 128, "1": 128}, "test": {"0": 100, "1": 100}},
        "expectations": [
            {
                "split": "train",
                "expectation": "expect_column_values_to_not_be_null",
                "column": "text",
                "kwargs": {"column": "text"},
                "success": True,
                "observed_value": None,
                "unexpected_count": 0,
                "unexpected_percent": 0.0,
            },
            {
                "split": "both",
                "expectation": "expect_column_values_to_be_in_set",
                "column": "label",
                "kwargs": {"column": "label", "value_set": [0, 1]},
                "success": True,
                "observed_value": f"a review with <br /> and {XSS}",
                "unexpected_count": 0,
                "unexpected_percent": 0.0,
            },
            {
                "split": "test",
                "expectation": "expect_table_row_count_to_be_between",
                "column": None,
                "kwargs": {"min_value": 200},
                "success": False,
                "observed_value": 199,
                "unexpected_count": None,
                "unexpected_percent": None,
            },
        ],
        "statistics": {"evaluated_expectations": 3},
        "validated_at": "2026-11-20T08:59:00+00:00",
        "gx_version": "1.24.1",
    }


def tokens_record() -> dict[str, Any]:
    edges = [0, 64, 128, 192, 256, 320, 384, 448, 512]

    def split(counts: list[int], truncated: float) -> dict[str, Any]:
        return {
            "count": sum(counts),
            "mean": 180.5,
            "median": 150.0,
            "p95": 420.0,
            "max": 512,
            "truncated_share": truncated,
            "histogram": {"bin_edges": edges, "counts": counts},
        }

    return {
        "key": "abc123",
        "cache_dir": "/tmp/cache/abc123",
        "tokenizer": {"name": "tiny-distilbert", "vocab_hash": "0f0f"},
        "max_length": 64,
        "truncation": "longest_first",
        "cache_hit": False,
        "stats": {
            "train": split([10, 60, 70, 50, 30, 20, 10, 6], 0.96),
            "test": split([8, 50, 55, 40, 22, 15, 6, 4], 0.955),
        },
    }
