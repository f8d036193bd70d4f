"""Step 2: validate the run's train/validation/test subsets with Great Expectations 1.x.

Schema, nulls, labels, text lengths, class balance, row counts, duplicates and overlap
between the subsets, as GX expectations on in-memory frames (ephemeral context: nothing is written to
the working directory). The summary always goes to `data/validation.json` (the report
reads it); a failure raises `DataValidationError`, so nothing downstream runs.

Thresholds are set to pass the real IMDB, full splits and every preset subset (it has 96
duplicated texts in train, 199 in test, 123 texts in both splits, reviews of 32 to
13,704 characters) and to stop data that is broken.
"""

from __future__ import annotations

import logging
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from tasks.config import ExperimentConfig
from tasks.paths import SPLITS, RunPaths, read_json, write_json
from tasks.steps import StepNotRun

log = logging.getLogger(__name__)

MAX_TEXT_CHARS = 100_000  # IMDB's longest review has 13,704 characters
POSITIVE_SHARE = (0.3, 0.7)  # IMDB subsets of 16 rows and more lie in [0.46, 0.57]
MIN_UNIQUE_TEXT_SHARE = 0.95  # full source splits; IMDB: 0.992 in the test split (199 duplicates)
# Subsets are drawn from deduplicated splits (tasks.data): no duplicate, no shared text.
MAX_OVERLAP_SHARE = 0.0  # share of a subset's rows whose text is in another subset
SOURCE_SUITE_VERSION = 1  # bump when the source suite changes: cached results then expire
TEXT_TYPE_COLUMN = "text_is_str"  # derived: True where the text is a str
OVERLAP_COLUMN = "in_other_split"  # derived: True where the text also occurs in another split


class DataValidationError(ValueError):
    """The data failed validation; `failures` holds the failed entries of validation.json."""

    def __init__(self, message: str, failures: list[dict[str, Any]] | None = None):
        super().__init__(message)  # args == (message,): the error pickles across processes
        self.failures = failures or []


def validate_dataset(config: ExperimentConfig, paths: RunPaths) -> Path:
    """Validate the full source splits (once per source: cached beside them) and the run's
    three subsets against the row counts that `config` asks for; write
    `paths.validation_json`; raise `DataValidationError` listing each failed expectation
    with its split, column and observed value."""
    import great_expectations as gx

    frames = {}
    for split in SPLITS:
        path = paths.split_parquet(split)
        if not path.exists():
            raise StepNotRun(path, "download")
        frames[split] = pd.read_parquet(path)
    sizes = {"train": config.train_size, "validation": config.val_size, "test": config.test_size}

    started = time.perf_counter()
    source = validate_source(config, paths)
    frames = with_derived_columns(frames)
    entries, gx_statistics = run_suites(frames, {s: expectations(n) for s, n in sizes.items()})
    seconds = time.perf_counter() - started
    entries = source["expectations"] + entries

    success = all(e["success"] for e in entries)
    summary = {
        "success": success,
        "rows": {split: len(frame) for split, frame in frames.items()},
        "class_balance": {split: _label_counts(frame) for split, frame in frames.items()},
        "expectations": entries,
        "source": {k: v for k, v in source.items() if k != "expectations"},
        # what the download step removed before drawing (absent for hand-made subsets)
        "deduplication": _draw(paths).get("deduplication"),
        "statistics": {
            **{split: _split_statistics(frame) for split, frame in frames.items()},
            "gx": gx_statistics,
            "thresholds": {"max_text_chars": MAX_TEXT_CHARS, "positive_share": list(POSITIVE_SHARE),
                           "min_unique_text_share": MIN_UNIQUE_TEXT_SHARE,
                           "max_overlap_share": MAX_OVERLAP_SHARE, "rows": sizes},
            "seconds": round(seconds, 3),
        },
        "validated_at": datetime.now(UTC).isoformat(),
        "gx_version": gx.__version__,
    }
    return _conclude(summary, paths)


def _draw(paths: RunPaths) -> dict[str, Any]:
    path = paths.data_dir / "draw.json"
    return read_json(path) if path.exists() else {}


def _conclude(summary: dict[str, Any], paths: RunPaths) -> Path:
    """Write validation.json; raise DataValidationError if an expectation failed."""
    write_json(paths.validation_json, summary)
    entries = summary["expectations"]
    log.info("validation %s: %s", "passed" if summary["success"] else "FAILED",
             paths.validation_json)
    if not summary["success"]:
        failures = [e for e in entries if not e["success"]]
        lines = "\n".join(f"  - {_describe(e)}" for e in failures)
        raise DataValidationError(
            f"data validation failed: {len(failures)} of {len(entries)} expectations "
            f"(details in {paths.validation_json}):\n{lines}", failures)
    return paths.validation_json


def refuse_unreadable(paths: RunPaths, problem: str) -> None:
    """Data that cannot even be read (e.g. invalid UTF-8): recorded in validation.json like
    a failed expectation, then DataValidationError."""
    entry = {"split": "source", "expectation": "readable_text", "column": None, "kwargs": {},
             "description": "the source files decode as UTF-8 text", "success": False,
             "observed_value": problem, "unexpected_count": None, "unexpected_percent": None,
             "exception": problem}
    _conclude({"success": False, "rows": {}, "class_balance": {}, "expectations": [entry],
               "validated_at": datetime.now(UTC).isoformat()}, paths)


def validate_source(config: ExperimentConfig, paths: RunPaths) -> dict[str, Any]:
    """The full source splits against a suite of their own (schema, text type, labels,
    balance, duplicates): a fault the drawn subsets happen to miss still stops the run.
    The result is cached beside the normalised splits, so each source is checked once."""
    from tasks.sources import SOURCE_SPLITS, source_folder

    folder = source_folder(config.data, paths.cache_dir)
    if not all((folder / f"{s}.parquet").exists() for s in SOURCE_SPLITS):
        return {"success": True, "expectations": [], "skipped": f"no full splits in {folder}: "
                "the subsets were not written by the download step"}
    cached = folder / f"validation-{SOURCE_SUITE_VERSION}.json"
    if cached.exists():
        result = read_json(cached)
        return {**result, "cached": True}
    frames = with_derived_columns(
        {f"source {s}": pd.read_parquet(folder / f"{s}.parquet") for s in SOURCE_SPLITS})
    entries, _ = run_suites(frames, {s: expectations() for s in frames})
    result = {"success": all(e["success"] for e in entries), "expectations": entries,
              "rows": {s: len(f) for s, f in frames.items()}, "folder": str(folder)}
    write_json(cached, result)
    return {**result, "cached": False}


def run_suites(frames: dict[str, pd.DataFrame],
               suites: dict[str, list]) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Each frame against its suite (GX, in memory): entries in suite order, statistics."""
    import great_expectations as gx

    context = _ephemeral_context()
    source = context.data_sources.add_pandas("imdb")
    entries, statistics = [], {}
    for split, frame in frames.items():
        batch = source.add_dataframe_asset(split).add_batch_definition_whole_dataframe(split)
        suite = context.suites.add(gx.ExpectationSuite(name=split, expectations=suites[split]))
        definition = context.validation_definitions.add(
            gx.ValidationDefinition(name=split, data=batch, suite=suite))
        result = definition.run(batch_parameters={"dataframe": frame}, result_format="SUMMARY")
        order = {e.id: i for i, e in enumerate(suite.expectations)}  # GX reorders results
        ordered = sorted(result.results,
                         key=lambda r: order.get(r.expectation_config.id, len(order)))
        entries += [_entry(split, r, frame.columns) for r in ordered]
        statistics[split] = _jsonable(result.statistics)
    return entries, statistics


def expectations(rows: int | None = None) -> list:
    """The suite for one subset of `rows` rows, or with `rows=None` for a full source
    split: there, what a drawn subset can miss (schema, types, labels, balance,
    duplicates). A fresh list each call: GX binds expectations to a suite."""
    import great_expectations.expectations as gxe

    low, high = POSITIVE_SHARE
    suite = [
        gxe.ExpectColumnToExist(column="text", description="schema: text column"),
        gxe.ExpectColumnToExist(column="label", description="schema: label column"),
        gxe.ExpectColumnValuesToNotBeNull(column="text", description="no missing texts"),
        gxe.ExpectColumnValuesToNotBeNull(column="label", description="no missing labels"),
        gxe.ExpectColumnValuesToBeInSet(column=TEXT_TYPE_COLUMN, value_set=[True],
                                        description="texts are strings, not bytes or numbers"),
        gxe.ExpectColumnValuesToBeOfType(column="label", type_="int64",
                                         description="labels are int64"),
        gxe.ExpectColumnValuesToBeInSet(column="label", value_set=[0, 1],
                                        description="labels in {0, 1}"),
        gxe.ExpectColumnMeanToBeBetween(column="label", min_value=low, max_value=high,
                                        description="class balance: share of positives"),
        gxe.ExpectColumnProportionOfUniqueValuesToBeBetween(
            column="text", min_value=MIN_UNIQUE_TEXT_SHARE if rows is None else 1.0,
            max_value=1.0, description="duplicates: share of distinct texts"),
    ]
    if rows is None:
        return suite
    return suite + [
        gxe.ExpectTableRowCountToEqual(value=rows, description="as many rows as requested"),
        gxe.ExpectColumnValueLengthsToBeBetween(column="text", min_value=1,
                                                max_value=MAX_TEXT_CHARS,
                                                description="text length in characters"),
        gxe.ExpectColumnValuesToMatchRegex(column="text", regex=r"\S",
                                           description="texts are not blank"),
        gxe.ExpectColumnMeanToBeBetween(
            column=OVERLAP_COLUMN, min_value=0.0, max_value=MAX_OVERLAP_SHARE,
            description="overlap: share of texts also in another split"),
    ]


def with_derived_columns(frames: dict[str, pd.DataFrame]) -> dict[str, pd.DataFrame]:
    """Columns computed with pandas so that per-split GX expectations can judge them:
    `text_is_str` (a bytes or numeric "text" is no review) and `in_other_split` (its text
    occurs in another split: overlap is a cross-split property). Without a text column
    everywhere they are left out, and their expectations fail as missing."""
    if not all("text" in f.columns for f in frames.values()):
        return frames
    out = {}
    for split, frame in frames.items():
        other = pd.concat([f["text"] for s, f in frames.items() if s != split]).dropna()
        is_str = frame["text"].map(lambda t: isinstance(t, str))
        out[split] = frame.assign(**{TEXT_TYPE_COLUMN: is_str,
                                     OVERLAP_COLUMN: frame["text"].isin(set(other))})
    return out


def _ephemeral_context():
    """An in-memory GX context (no gx/ folder) with progress bars off (they flood task logs)."""
    import great_expectations as gx
    from great_expectations.data_context.types.base import ProgressBarsConfig

    context = gx.get_context(mode="ephemeral")
    context.variables.progress_bars = ProgressBarsConfig(globally=False)
    return context


def _entry(split: str, result, columns) -> dict[str, Any]:
    config, outcome = result.expectation_config, result.result or {}
    kwargs = {k: v for k, v in config.kwargs.items() if k != "batch_id"}
    observed = outcome.get("observed_value")
    if config.type == "expect_column_to_exist" and not result.success:
        observed = f"missing; columns are {list(columns)}"
    if observed is None and outcome.get("unexpected_count"):
        observed = [{"value": _short(c["value"]), "count": c["count"]}
                    for c in outcome.get("partial_unexpected_counts", [])[:5]]
    return _jsonable({
        "split": split,
        "expectation": config.type,
        "column": kwargs.get("column"),
        "kwargs": kwargs,
        "description": config.description,
        "success": bool(result.success),
        "observed_value": observed,
        "unexpected_count": outcome.get("unexpected_count"),
        "unexpected_percent": outcome.get("unexpected_percent"),
        "exception": _exception_message(result.exception_info),
    })


def _exception_message(info: dict | None) -> str | None:
    """GX reports an error (e.g. a missing column) either flat or keyed by metric id."""
    candidates = [info or {}] + [v for v in (info or {}).values() if isinstance(v, dict)]
    for candidate in candidates:
        if candidate.get("raised_exception"):
            return str(candidate.get("exception_message"))
    return None


def _describe(entry: dict[str, Any]) -> str:
    """One line of the failure message: split, expectation, column, bounds, observed value."""
    args = [str(entry["column"])] if entry["column"] else []
    args += [f"{k}={v!r}" for k, v in entry["kwargs"].items() if k != "column"]
    call = f"{entry['expectation']}({', '.join(args)})"
    observed_value = entry["observed_value"]
    if entry["exception"]:
        observed = f"error: {entry['exception']}"
    elif entry["unexpected_count"]:
        examples = ", ".join(f"{c['value']!r} (x{c['count']})" for c in observed_value or []
                             if c["value"] is not None)  # nulls say nothing the name doesn't
        observed = (f"observed {entry['unexpected_count']} unexpected rows "
                    f"({entry['unexpected_percent']:.2f}%)")
        observed += f", e.g. {examples}" if examples else ""
    else:
        shown = round(observed_value, 4) if isinstance(observed_value, float) else observed_value
        observed = f"observed {shown!r}"
    return f"{entry['split']}: {call} [{entry['description']}]: {observed}"


def _label_counts(frame: pd.DataFrame) -> dict[str, int]:
    if "label" not in frame.columns:
        return {}
    counts = frame["label"].value_counts(dropna=False).sort_index()
    return {_label_key(k): int(v) for k, v in counts.items()}


def _label_key(value: Any) -> str:
    if pd.isna(value):
        return "null"
    if isinstance(value, (int, float, np.number)) and float(value).is_integer():
        return str(int(value))
    return str(value)


def _split_statistics(frame: pd.DataFrame) -> dict[str, Any]:
    """Plain facts about one split for the report; what a broken frame lacks stays null."""
    stats: dict[str, Any] = {"rows": len(frame), "columns": list(frame.columns)}
    if "label" in frame.columns and pd.api.types.is_numeric_dtype(frame["label"]):
        stats["positive_share"] = float(frame["label"].mean()) if len(frame) else None
    if "text" in frame.columns:
        lengths = frame["text"].map(lambda t: len(t) if isinstance(t, str) else np.nan).dropna()
        stats["text_chars"] = ({"min": int(lengths.min()), "median": float(lengths.median()),
                                "max": int(lengths.max())} if len(lengths) else None)
        stats["duplicate_texts"] = int(frame["text"].dropna().duplicated().sum())
    if OVERLAP_COLUMN in frame.columns:
        stats["texts_in_other_split"] = int(frame[OVERLAP_COLUMN].sum())
    return stats


def _short(value: Any, limit: int = 80) -> Any:
    """Reviews are long: failure examples show their first characters only."""
    if isinstance(value, str) and len(value) > limit:
        return value[:limit] + "..."
    return value


def _jsonable(value: Any) -> Any:
    """numpy scalars, NaN and GX's dict subclasses as plain JSON values."""
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set)):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not np.isfinite(value):
        return None
    return value
