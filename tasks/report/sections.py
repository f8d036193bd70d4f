"""The report's supporting sections, from the stored files: data validation, class
balance, parameter breakdown, training curves and provenance."""

from __future__ import annotations

import json
from typing import Any

from tasks.environment import environment
from tasks.metrics import MetricsRecord
from tasks.report.format import as_float, as_int


def dicts(value: Any) -> list[dict[str, Any]]:
    """The dict entries of a stored list (anything else: empty), for tables of records."""
    return [x for x in value if isinstance(x, dict)] if isinstance(value, list) else []


def parameter_breakdown(records: list[MetricsRecord]) -> tuple[str | None, dict[str, Any]]:
    """(variant, breakdown) of the first successful LoRA record that stored one, else of
    any trained record; only well-formed table entries are kept, plus the trained share."""
    with_breakdown = [r for r in records if r.ok and isinstance(r.parameter_breakdown, dict)]
    source = next((r for r in with_breakdown if r.method == "lora"),
                  with_breakdown[0] if with_breakdown else None)
    if source is None:
        return None, {}
    pb = dict(source.parameter_breakdown or {})
    trainable, total = as_float(pb.get("trainable")), as_float(pb.get("total"))
    pb.update(components=dicts(pb.get("components")), matrices=dicts(pb.get("matrices")),
              trained_share=trainable / total if trainable is not None and total else None)
    return source.variant, pb


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
    validation = validation or {}
    balance = validation.get("class_balance")
    rows = validation.get("rows") if isinstance(validation.get("rows"), dict) else {}
    order = {"train": 0, "validation": 1, "test": 2}
    out = []
    for split, counts in (sorted(balance.items(), key=lambda kv: order.get(kv[0], 9))
                          if isinstance(balance, dict) else []):
        counts = counts if isinstance(counts, dict) else {}
        neg, pos = as_int(counts.get("0")) or 0, as_int(counts.get("1")) or 0
        out.append({"split": split, "rows": as_int(rows.get(split)) or neg + pos,
                    "negative": neg, "positive": pos,
                    "positive_share": pos / (neg + pos) if neg + pos else None})
    return out


def _points(history: list[Any] | None, x_key: str, y_key: str) -> tuple[list, list]:
    """(xs, ys) of a history of {x_key, y_key} dicts; malformed entries are dropped."""
    xs, ys = [], []
    for item in history or []:
        if isinstance(item, dict) and as_float(item.get(x_key)) is not None \
                and as_float(item.get(y_key)) is not None:
            xs.append(item[x_key])
            ys.append(item[y_key])
    return xs, ys


def training_series(records: list[MetricsRecord],
                    labels: dict[str, str]) -> tuple[list[dict], list[dict]]:
    """Loss per step and validation accuracy per epoch of each record."""
    loss, evals = [], []
    for r in records:
        label = labels.get(r.variant, r.variant)
        steps, values = _points(r.loss_history, "step", "loss")
        if steps:
            loss.append({"label": label, "method": r.method, "steps": steps, "values": values})
        epochs, accs = _points(r.eval_history, "epoch", "accuracy")
        if epochs:
            evals.append({"label": label, "method": r.method, "epochs": epochs, "values": accs})
    return loss, evals


def tokenizer_name(tokens: dict[str, Any] | None) -> str:
    """The tokenizer as a person knows it: the model source it came with (older runs
    stored only its load path) and its class."""
    tokens = tokens or {}
    identity = tokens.get("tokenizer") if isinstance(tokens.get("tokenizer"), dict) else {}
    name = str(tokens.get("model") or identity.get("name") or "unknown")
    return f"{name} ({identity['class']})" if identity.get("class") else name


def provenance(run_id: str, config: dict[str, Any] | None, records: list[MetricsRecord],
               stored_env: dict[str, Any] | None) -> dict[str, Any]:
    """Where the numbers came from. Times and devices come from the records; the commit,
    versions and platform from the run's environment.json (written when the run was
    prepared), else from the code that builds this report (labelled so)."""
    env = stored_env or environment()
    started = [r.started_at for r in records if isinstance(r.started_at, str)]
    finished = [r.finished_at for r in records if isinstance(r.finished_at, str)]
    params = [(k, v if isinstance(v, str) else json.dumps(v, sort_keys=True))
              for k, v in sorted((config or {}).items())]
    return {
        "run_id": run_id,
        "preset": (config or {}).get("preset") or "unknown",
        "params": params,
        "started_at": min(started) if started else None,
        "finished_at": max(finished) if finished else None,
        "git_commit": env.get("git_commit", "unknown"),
        "packages": env.get("packages") or {},
        "python": env.get("python", "unknown"),
        "platform": env.get("platform", "unknown"),
        "env_source": "the run" if stored_env else "the report builder",
        "devices": sorted({str(r.device) for r in records if r.device and r.status != "not run"}),
        "precisions": sorted({str(r.precision) for r in records if r.precision}),
        "hosts": sorted({str(r.host) for r in records if r.host and r.status != "not run"}),
        "memory_kinds": sorted({str(r.peak_memory_kind) for r in records if r.peak_memory_kind}),
        "variants": variant_provenance(records),
    }


VARIANT_PROVENANCE = ("device_name", "host", "precision", "torch", "cuda", "transformers",
                      "git_commit")


def variant_provenance(records: list[MetricsRecord]) -> list[dict[str, Any]]:
    """Where each variant ran, as it recorded itself (older records: device and host only)."""
    rows = []
    for r in records:
        if r.status == "not run":
            continue
        stored = r.provenance if isinstance(r.provenance, dict) else {}
        row = {k: str(stored[k]) if stored.get(k) is not None else None
               for k in VARIANT_PROVENANCE}
        row.update(variant=r.variant, device=str(stored.get("device") or r.device or ""),
                   host=row["host"] or (str(r.host) if r.host else None),
                   precision=row["precision"] or r.precision)
        rows.append(row)
    return rows
