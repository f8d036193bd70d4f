"""What the report knows about a run: the stored files loaded and checked, the comparison
rows, the training curves and the provenance.

Nothing here estimates a missing number: a value that was not stored stays None and the
page says so.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path
from typing import Any

import numpy as np

from tasks.environment import environment
from tasks.metrics import REQUIRED_FIELDS
from tasks.paths import read_json

METHOD_LABELS = {
    "baseline": "baseline",
    "linear_probe": "linear probe",
    "lora": "LoRA",
    "full_finetune": "full fine-tuning",
}
METHOD_ORDER = {m: i for i, m in enumerate(METHOD_LABELS)}
PREDICTION_COLUMNS = ("row", "label", "pred")


def as_float(v: Any) -> float | None:
    """A finite number from a record; anything else (missing, text, NaN) becomes None."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    return None if math.isnan(v) or math.isinf(v) else float(v)


def as_int(v: Any) -> int | None:
    """A count from a record (JSON may hold 1.0 for 1); anything else becomes None."""
    x = as_float(v)
    return None if x is None else int(x)


def _method_of(name: str) -> str:
    if name.startswith("lora_"):
        return "lora"
    if name.startswith("full_finetune"):
        return "full_finetune"
    if name.startswith("linear_probe"):
        return "linear_probe"
    return "baseline" if name in ("majority", "tfidf_logreg", "seed_heuristic") else "unknown"


# --- loading -------------------------------------------------------------------------------------


def _read(path: Path, what: str, key: str, missing: dict[str, str]) -> Any:
    if not path.exists():
        missing[key] = (
            f"{what} not available: {path.parent.name}/{path.name} was not stored for this run."
        )
        return None
    try:
        data = read_json(path)
        if not isinstance(data, dict):
            raise TypeError(f"expected a JSON object, found {type(data).__name__}")
        return data
    except (OSError, ValueError, TypeError) as err:
        missing[key] = f"{what} could not be read ({path.parent.name}/{path.name}: {err})."
        return None


def expected_variants(config: dict[str, Any] | None) -> list[tuple[str, str]]:
    """(name, method) of every variant the config asked for, named as tasks.train.variant_name
    does (the pinned contract), without importing the training stack."""
    if not isinstance(config, dict):
        return []
    try:
        seeds = list(config.get("seeds") or [])
        out = [
            (f"linear_probe_s{seeds[0]}", "linear_probe")
            if b == "linear_probe"
            else (b, "baseline")
            for b in config.get("baselines") or []
            if b != "linear_probe" or seeds
        ]
        out += [
            (f"lora_r{r}_{t.replace(',', '+')}_s{s}", "lora")
            for r in config.get("ranks") or []
            for t in config.get("targets") or []
            for s in seeds
        ]
        if config.get("full_finetune", True):
            out += [(f"full_finetune_s{s}", "full_finetune") for s in seeds]
        return out
    except (TypeError, AttributeError):  # a hand-edited config: report what exists only
        return []


def _load_variant(folder: Path) -> dict[str, Any]:
    name = folder.name
    base = {"variant": name, "method": _method_of(name), "problems": [], "predictions": None}
    metrics = folder / "metrics.json"
    if not metrics.exists():
        return {
            **base,
            "status": "incomplete",
            "error": "no metrics.json in the results folder: the step was interrupted or is still running",
        }
    try:
        record = read_json(metrics)
        if not isinstance(record, dict):
            raise TypeError("not a JSON object")
    except (OSError, ValueError, TypeError) as err:
        return {**base, "status": "unreadable", "error": f"metrics.json could not be read: {err}"}
    rec = {k: None for k in REQUIRED_FIELDS} | record | {"problems": [], "predictions": None}
    absent = [k for k in REQUIRED_FIELDS if k not in record]
    if absent:
        rec["problems"].append(f"metrics.json lacks {', '.join(absent)}")
    if rec["variant"] != name:
        rec["problems"].append(
            f"metrics.json names variant {rec['variant']!r}; the folder is {name!r}"
        )
        rec["variant"] = name
    if rec["method"] not in METHOD_LABELS:
        rec["method"] = _method_of(name)
    if rec["status"] == "running":
        rec.update(
            status="incomplete",
            error=rec.get("error") or "the record says the step is still running",
        )
    elif rec["status"] == "ok" and as_float(rec["accuracy"]) is None:
        rec.update(status="invalid", error=f"status ok but accuracy is {rec['accuracy']!r}")
    elif rec["status"] not in ("ok", "failed"):
        rec.update(status="invalid", error=rec.get("error") or f"unknown status {rec['status']!r}")
    if rec["status"] == "ok":
        rec["predictions"] = _load_predictions(folder / "predictions.parquet", rec["problems"])
        if rec.get("confusion_matrix") is None and rec["predictions"] is not None:
            p = rec["predictions"]
            rec["confusion_matrix"] = [
                [int(((p.label == t) & (p.pred == q)).sum()) for q in (0, 1)] for t in (0, 1)
            ]
    return rec


def _load_predictions(path: Path, problems: list[str]):
    import pandas as pd

    if not path.exists():
        problems.append("predictions.parquet is missing")
        return None
    try:
        frame = pd.read_parquet(path)
    except (OSError, ValueError) as err:  # pyarrow's errors derive from these
        problems.append(f"predictions.parquet could not be read: {err}")
        return None
    lacking = [c for c in PREDICTION_COLUMNS if c not in frame.columns]
    if lacking:
        problems.append(f"predictions.parquet lacks columns {lacking}")
        return None
    return frame


_LORA_NAME = re.compile(r"^lora_r(\d+)_(.+)_s\d+$")


def _sort_key(v: dict[str, Any]) -> tuple:
    """Baselines, linear probe, LoRA by rank and target set, full fine-tuning; a failed LoRA
    record may lack rank and targets, so they are read from its name as well."""
    named = _LORA_NAME.match(v["variant"])
    rank = as_float(v.get("rank")) or (int(named.group(1)) if named else 0)
    targets = v.get("targets") or (named.group(2) if named else "")
    return (METHOD_ORDER.get(v["method"], 9), rank, str(targets), v["variant"])


def load_stored(run_dir: Path) -> dict[str, Any]:
    """Everything the report reads; `missing` says which stored file was absent or unreadable
    (keys config, validation, tokens)."""
    missing: dict[str, str] = {}
    config = _read(run_dir / "config.json", "Run parameters", "config", missing)
    validation = _read(
        run_dir / "data" / "validation.json", "Validation result", "validation", missing
    )
    tokens = _read(run_dir / "data" / "tokens.json", "Tokenization summary", "tokens", missing)
    env_file = run_dir / "environment.json"
    env = read_json(env_file) if env_file.exists() else None
    results = run_dir / "results"
    variants = (
        {d.name: _load_variant(d) for d in sorted(results.iterdir()) if d.is_dir()}
        if results.is_dir()
        else {}
    )
    for name, method in expected_variants(config):
        if name not in variants:  # asked for but never started: say so, do not drop it
            variants[name] = {
                "variant": name,
                "method": method,
                "status": "not run",
                "problems": [],
                "predictions": None,
                "error": "no results folder: the step did not run",
            }
    return {
        "config": config,
        "validation": validation,
        "tokens": tokens,
        "environment": env,
        "variants": sorted(variants.values(), key=_sort_key),
        "missing": missing,
    }


# --- rows and series ------------------------------------------------------------------------


def comparison_rows(variants: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """One flat row per variant: raw numbers (formatting is the template's job)."""
    rows = []
    for v in variants:
        ci = v.get("accuracy_ci95") if isinstance(v.get("accuracy_ci95"), list) else [None, None]
        latency = v.get("latency_ms") if isinstance(v.get("latency_ms"), dict) else {}
        trainable, total = as_int(v.get("params_trainable")), as_int(v.get("params_total"))
        rows.append(
            {
                "variant": v["variant"],
                "method": v["method"],
                "status": v["status"],
                "accuracy": as_float(v.get("accuracy")),
                "accuracy_ci_low": as_float(ci[0]) if len(ci) == 2 else None,
                "accuracy_ci_high": as_float(ci[1]) if len(ci) == 2 else None,
                "f1": as_float(v.get("f1")),
                "params_trainable": as_int(v.get("params_trainable")),
                "params_total": as_int(v.get("params_total")),
                "trainable_share": trainable / total if trainable is not None and total else None,
                "train_seconds": as_float(v.get("train_seconds")),
                "seconds_per_step": as_float(v.get("seconds_per_step")),
                "samples_per_second": as_float(v.get("samples_per_second")),
                "peak_memory_bytes": as_int(v.get("peak_memory_bytes")),
                "artifact_bytes": as_int(v.get("artifact_bytes")),
                "inference_ms_per_example": as_float(v.get("inference_ms_per_example")),
                "latency_merged_ms": as_float(latency.get("merged")),
                "latency_unmerged_ms": as_float(latency.get("unmerged")),
                "latency_base_ms": as_float(latency.get("base")),
                "rank": as_int(v.get("rank")),
                "targets": v.get("targets"),
                "seed": v.get("seed"),
                "error": v.get("error"),
            }
        )
    return rows


def dicts(value: Any) -> list[dict[str, Any]]:
    """The dict entries of a stored list (anything else: empty), for tables of records."""
    return [x for x in value if isinstance(x, dict)] if isinstance(value, list) else []


def parameter_breakdown(variants: list[dict[str, Any]]) -> tuple[str | None, dict[str, Any]]:
    """(variant, breakdown) from the first successful LoRA record that stored one, else a
    full fine-tuning record; only well-formed table entries are kept, plus the trained share."""
    source = next(
        (
            v
            for v in sorted(variants, key=lambda v: v["method"] != "lora")
            if v["status"] == "ok" and isinstance(v.get("parameter_breakdown"), dict)
        ),
        None,
    )
    if source is None:
        return None, {}
    pb = dict(source["parameter_breakdown"])
    trainable, total = as_float(pb.get("trainable")), as_float(pb.get("total"))
    pb.update(
        components=dicts(pb.get("components")),
        matrices=dicts(pb.get("matrices")),
        trained_share=trainable / total if trainable is not None and total else None,
    )
    return source["variant"], pb  # fmt: skip


def expectation_rows(validation: dict[str, Any] | None) -> list[dict[str, Any]]:
    """validation.json's expectations, failed ones first; `column` is shown in its own
    table column, so it is dropped from the kwargs shown beside the expectation."""
    rows = []
    for e in dicts((validation or {}).get("expectations")):
        kwargs = e.get("kwargs") if isinstance(e.get("kwargs"), dict) else {}
        rows.append({**e, "kwargs": {k: v for k, v in kwargs.items() if k != "column"}})
    return sorted(rows, key=lambda e: e.get("success") is True)  # stable: file order otherwise


def class_balance(validation: dict[str, Any] | None) -> list[dict[str, Any]]:
    """Rows of validation.json's class balance: split, rows, negatives, positives, share."""
    out = []
    balance = (validation or {}).get("class_balance")
    rows = (
        (validation or {}).get("rows") if isinstance((validation or {}).get("rows"), dict) else {}
    )
    for split, counts in sorted(balance.items()) if isinstance(balance, dict) else []:
        counts = counts if isinstance(counts, dict) else {}
        neg, pos = as_int(counts.get("0")) or 0, as_int(counts.get("1")) or 0
        out.append(
            {
                "split": split,
                "rows": as_int(rows.get(split)) or neg + pos,
                "negative": neg,
                "positive": pos,
                "positive_share": pos / (neg + pos) if neg + pos else None,
            }
        )
    return out


def _points(history: list[Any] | None, x_key: str, y_key: str) -> tuple[list, list]:
    """(xs, ys) of a history whose entries are numbers (x = position from 1) or dicts
    ({x_key, y_key}, as tasks.train writes them); non-numeric entries are dropped."""
    xs, ys = [], []
    for i, item in enumerate(history or []):
        x, y = (item.get(x_key, i + 1), item.get(y_key)) if isinstance(item, dict) else (i + 1, item)
        if as_float(x) is not None and as_float(y) is not None:
            xs.append(x)
            ys.append(y)
    return xs, ys


def training_series(variants: list[dict[str, Any]]) -> tuple[list[dict], list[dict]]:
    """Loss per step and accuracy per epoch of each variant."""
    loss, evals = [], []
    for v in variants:
        steps, values = _points(v.get("loss_history"), "step", "loss")
        if steps:
            loss.append({"variant": v["variant"], "steps": steps, "values": values})
        epochs, accs = _points(v.get("eval_history"), "epoch", "accuracy")
        if epochs:
            evals.append({"variant": v["variant"], "epochs": epochs, "values": accs})
    return loss, evals


# --- provenance ----------------------------------------------------------------------------------------


def provenance(
    config: dict[str, Any] | None, variants: list[dict[str, Any]], run_id: str,
    stored_env: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Where the numbers came from. Times and devices come from the records; the commit,
    versions and platform from the run's environment.json (written when the run was
    prepared), else from the code that builds this report (labelled so)."""
    env = stored_env or environment()
    started = [v["started_at"] for v in variants if isinstance(v.get("started_at"), str)]
    finished = [v["finished_at"] for v in variants if isinstance(v.get("finished_at"), str)]
    params = [
        (k, v if isinstance(v, str) else json.dumps(v, sort_keys=True))  # as config.json has them
        for k, v in sorted((config or {}).items())
    ]
    return {
        "run_id": run_id,
        "preset": (config or {}).get("preset") or "unknown",
        "params": params,
        "started_at": min(started) if started else None,
        "finished_at": max(finished) if finished else None,
        "git_commit": env["git_commit"],
        "packages": env["packages"],
        "python": env["python"],
        "platform": env["platform"],
        "env_source": "the run" if stored_env else "the report builder",
        "devices": sorted({str(v["device"]) for v in variants if v.get("device")}),
        "hosts": sorted({str(v["host"]) for v in variants if v.get("host")}),
        "memory_kinds": sorted(
            {str(v["peak_memory_kind"]) for v in variants if v.get("peak_memory_kind")}
        ),
    }
