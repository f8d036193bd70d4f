"""What the report reads: a run's stored files, loaded once and never trusted blindly.

It reads only what the steps stored (config.json, environment.json, data/validation.json,
data/tokens.json, results/*/metrics.json and predictions.parquet), so any run can be
re-reported later. A file that is missing or unreadable is listed in `missing`; a
variant the config asked for that never started is listed as `not run`; nothing is
estimated.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pandas as pd

from tasks import registry
from tasks.config import ExperimentConfig
from tasks.metrics import MetricsRecord
from tasks.paths import read_json
from tasks.registry import Variant

PREDICTION_COLUMNS = ("row", "label", "pred")


@dataclass
class StoredRun:
    run_id: str
    config: dict[str, Any] | None
    validation: dict[str, Any] | None
    tokens: dict[str, Any] | None
    environment: dict[str, Any] | None
    records: list[MetricsRecord]  # registry order, then by name
    predictions: dict[str, pd.DataFrame] = field(default_factory=dict)  # ok variants' test rows
    missing: dict[str, str] = field(default_factory=dict)  # file key -> why it is absent


def _json(path: Path, what: str, key: str, missing: dict[str, str]) -> dict[str, Any] | None:
    if not path.exists():
        missing[key] = f"{what} not available: {path.parent.name}/{path.name} was not stored."
        return None
    try:
        data = read_json(path)
        if not isinstance(data, dict):
            raise ValueError(f"expected a JSON object, found {type(data).__name__}")
        return data
    except (OSError, ValueError) as err:
        missing[key] = f"{what} could not be read ({path.parent.name}/{path.name}: {err})."
        return None


def _placeholder(name: str, status: str, error: str) -> MetricsRecord:
    """A record for a variant without a readable metrics.json."""
    try:
        method = Variant.parse(name).method
    except ValueError:
        method = "unknown"
    # no start time or host: none was recorded (the defaults would be this build's)
    return MetricsRecord(variant=name, method=method, model="unknown", preset="unknown",
                         status=status, error=error, started_at=None, host=None)


def _load_record(folder: Path) -> MetricsRecord:
    name = folder.name
    if not (folder / "metrics.json").exists():
        return _placeholder(name, "incomplete", "no metrics.json in the results folder: the "
                            "step was interrupted or is still running")
    try:
        record = MetricsRecord.read(folder / "metrics.json")
    except (OSError, ValueError) as err:
        return _placeholder(name, "unreadable", f"metrics.json could not be read: {err}")
    if record.variant != name:
        record.problems.append(f"metrics.json names variant {record.variant!r}; the folder is "
                               f"{name!r}")
        record.variant = name
    try:
        record.method = Variant.parse(name).method  # the folder name is the variant's id
    except ValueError:
        record.problems.append(f"{name!r} is not a variant name of any known method")
        record.method = "unknown"
    if record.status == "running":
        record.status = "incomplete"
        record.error = record.error or "the record says the step is still running"
    elif record.ok and record.accuracy is None:
        record.status, record.error = "invalid", "status ok but no test accuracy"
    return record


def _load_predictions(path: Path, problems: list[str]) -> pd.DataFrame | None:
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


def expected_variants(config: dict[str, Any] | None, missing: dict[str, str]) -> list[Variant]:
    """The variants the stored config asks for (empty, with a note, if it cannot say)."""
    if config is None:
        return []
    try:
        return ExperimentConfig.from_dict(config).variants()
    except (TypeError, ValueError) as err:
        missing["variants"] = (f"The variants this run asked for cannot be listed: its "
                               f"config.json is not a valid configuration ({err}).")
        return []


def sort_key(record: MetricsRecord) -> tuple:
    order = list(registry.METHODS)
    try:
        v = Variant.parse(record.variant)
        dims = (v.rank or 0, v.targets or "", v.lr or 0.0, -1 if v.seed is None else v.seed)
    except ValueError:
        dims = (0, "", 0.0, -1)
    rank = order.index(record.method) if record.method in order else len(order)
    return (rank, *dims, record.variant)


def load_stored_run(run_dir: Path) -> StoredRun:
    missing: dict[str, str] = {}
    config = _json(run_dir / "config.json", "Run parameters", "config", missing)
    run = StoredRun(
        run_id=run_dir.name, config=config,
        validation=_json(run_dir / "data" / "validation.json", "Validation result",
                         "validation", missing),
        tokens=_json(run_dir / "data" / "tokens.json", "Tokenization summary", "tokens", missing),
        environment=_json(run_dir / "environment.json", "Environment", "environment", {}),
        records=[], missing=missing)
    results = run_dir / "results"
    records = {d.name: _load_record(d) for d in sorted(results.iterdir())
               if d.is_dir() and not d.name.startswith(".")} if results.is_dir() else {}
    for variant in expected_variants(config, missing):
        if variant.name not in records:  # asked for but never started: say so, never drop it
            records[variant.name] = _placeholder(variant.name, "not run",
                                                 "no results folder: the step did not run")
    run.records = sorted(records.values(), key=sort_key)
    for record in run.records:
        if record.ok:
            frame = _load_predictions(results / record.variant / "predictions.parquet",
                                      record.problems)
            if frame is not None:
                run.predictions[record.variant] = frame
    return run
