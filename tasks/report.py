"""The report of a run (issue 5): one self-contained HTML page, the comparison table as CSV
and Markdown, and a `summary.json` that the index of all runs reads.

It reads only what the steps stored (config.json, data/validation.json, data/tokens.json,
results/*/metrics.json and predictions.parquet), so any run can be re-reported later;
anything missing is said so on the page, never guessed. The output is byte-stable: the
same stored files give the same bytes (no build time, seeded bootstrap, fixed SVG ids).
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any
from urllib.parse import quote

import numpy as np
from jinja2 import Environment, FileSystemLoader
from markupsafe import Markup

from tasks import plots
from tasks.paths import read_json, safe_run_id, write_json, write_text
from tasks.paths import reports_root as default_reports_root
from tasks.report_data import (
    METHOD_LABELS,
    as_int,
    class_balance,
    comparison_rows,
    expectation_rows,
    load_stored,
    parameter_breakdown,
    provenance,
    training_series,
)
from tasks.report_format import FILTERS, markdown_table
from tasks.report_headline import headline

log = logging.getLogger(__name__)
TEMPLATES = Path(__file__).parent / "templates"
CSV_COLUMNS = (
    "variant",
    "method",
    "status",
    "accuracy",
    "accuracy_ci_low",
    "accuracy_ci_high",
    "f1",
    "params_trainable",
    "params_total",
    "trainable_share",
    "train_seconds",
    "seconds_per_step",
    "samples_per_second",
    "peak_memory_bytes",
    "artifact_bytes",
    "inference_ms_per_example",
    "latency_merged_ms",
    "latency_unmerged_ms",
    "latency_base_ms",
    "rank",
    "targets",
    "seed",
    "error",
)


def _env() -> Environment:
    env = Environment(
        loader=FileSystemLoader(str(TEMPLATES)),
        autoescape=True,
        trim_blocks=True,
        lstrip_blocks=True,
        keep_trailing_newline=True,
    )
    env.filters.update(FILTERS)
    env.globals["method_label"] = lambda m: METHOD_LABELS.get(m, m or "unknown")
    return env


def _clean(value: Any) -> Any:
    """JSON-safe copy: NaN/inf become null (JSON has no NaN), numpy scalars become Python."""
    if isinstance(value, dict):
        return {str(k): _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    if isinstance(value, (np.integer, np.floating)):
        value = value.item()
    if isinstance(value, float) and (math.isnan(value) or math.isinf(value)):
        return None
    return value


def _csv(rows: list[dict[str, Any]]) -> str:
    import pandas as pd

    frame = pd.DataFrame(
        [{c: r.get(c) for c in CSV_COLUMNS} for r in rows], columns=list(CSV_COLUMNS)
    )
    return frame.to_csv(index=False, lineterminator="\n")


# --- the page -----------------------------------------------------------------------------------


def _draw(title: str, caption: str, plot, *args: Any, wide: bool = False) -> dict[str, Any] | None:
    """One figure for the page (`wide`: across the whole grid); a plot that fails on odd
    stored values becomes a note instead of taking the whole report down."""
    figure = {"title": title, "caption": caption, "svg": None, "wide": wide}
    try:
        svg = plot(*args)
    except (ValueError, TypeError, KeyError, IndexError) as err:
        log.warning("plot %r could not be drawn: %s", title, err)
        return figure | {"caption": f"Could not be drawn from the stored values: {err}"}
    return figure | {"svg": Markup(svg)} if svg else None


def _figures(stored: dict[str, Any], rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    ok_rows = [r for r in rows if r["status"] == "ok"]
    ok = [v for v in stored["variants"] if v["status"] == "ok"]
    loss, evals = training_series(ok)
    confusion = [{"variant": v["variant"], "matrix": v.get("confusion_matrix")} for v in ok]
    with_ci = [{**r, "ci": [r["accuracy_ci_low"], r["accuracy_ci_high"]]} for r in ok_rows]
    figures = [
        _draw(
            "Accuracy with 95% intervals",
            "Bootstrap over test examples (test-set noise only).",
            plots.accuracy_ci,
            with_ci,
        ),
        _draw(
            "Accuracy against trainable parameters",
            "Variants that train no parameters are left out.",
            plots.accuracy_vs_params,
            ok_rows,
        ),
        _draw(
            "Training loss per step",
            "Faint: every logged step; solid: moving average.",
            plots.loss_curves,
            loss,
        ),
        _draw(
            "Test accuracy per epoch",
            "Evaluated on the whole test subset after each epoch.",
            plots.eval_curves,
            evals,
        ),
        _draw(
            "Training time and peak memory",
            "Peak memory as measured by the training step.",
            plots.cost_bars,
            ok_rows,
        ),
        _draw(
            "Accuracy against LoRA rank",
            "Line: mean over seeds; dots: single seeds.",
            plots.accuracy_vs_rank,
            ok_rows,
        ),
        _draw(
            "Confusion matrices",
            "Rows: true label; columns: predicted label.",
            plots.confusion_grid,
            confusion,
            wide=True,
        ),
    ]
    return [f for f in figures if f]


def _page_parts(
    stored: dict[str, Any],
    rows: list[dict[str, Any]],
    head: dict[str, Any],
    prov: dict[str, Any],
    run_id: str,
) -> dict[str, Any]:
    """Template values beyond the loaded files: figures, sanitised tables, the raw data."""
    tokens = stored["tokens"] or {}
    stats = tokens.get("stats") if isinstance(tokens.get("stats"), dict) else {}
    breakdown, pb = parameter_breakdown(stored["variants"])
    records = [{k: v for k, v in rec.items() if k != "predictions"} for rec in stored["variants"]]
    data = {
        "run_id": run_id,
        "config": stored["config"],
        "validation": stored["validation"],
        "tokens": stored["tokens"],
        "variants": records,
        "comparison": rows,
        "headline": head,
        "provenance": prov,
        "missing": stored["missing"],
    }
    return {
        "figures": _figures(stored, rows),
        "token_fig": _draw("Token-length distribution",
                           "Lengths before truncation; reviews right of the dashed line are cut.",
                           plots.token_histogram, stats, as_int(tokens.get("max_length"))),
        "token_stats": [(k, v) for k, v in sorted(stats.items()) if isinstance(v, dict)],
        "breakdown": breakdown, "pb": pb,
        "balance": class_balance(stored["validation"]),
        "expectations": expectation_rows(stored["validation"]),
        "problems": [v for v in stored["variants"] if v["status"] != "ok" or v["problems"]],
        "notes": [v for v in stored["variants"] if v.get("notes")],
        "data": _clean(data),
    }  # fmt: skip


def build_report(run_dir: Path | str, reports_root: Path | str | None = None) -> Path:
    """Write <reports_root>/<run_id>/report.html, comparison.csv, comparison.md and
    summary.json from the stored files of `run_dir`, then refresh the index."""
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    run_id = safe_run_id(run_dir.name)
    root = Path(reports_root) if reports_root is not None else default_reports_root()
    out = root.resolve() / run_id

    stored = load_stored(run_dir)
    rows = comparison_rows(stored["variants"])
    head = headline(stored["variants"])
    prov = provenance(stored["config"], stored["variants"], run_id, stored["environment"])
    config = stored["config"] or {}
    html = _env().get_template("report.html").render(
        run_id=run_id, config=config, rows=rows, head=head, prov=prov, stored=stored,
        **_page_parts(stored, rows, head, prov, run_id),
    )  # fmt: skip
    write_text(out / "comparison.csv", _csv(rows))
    write_text(out / "comparison.md", markdown_table(rows))
    report = write_text(out / "report.html", html)
    write_json(
        out / "summary.json",
        _clean(
            {
                "run_id": run_id,
                "report": "report.html",
                "preset": config.get("preset"),
                "model": config.get("model"),
                "started_at": prov["started_at"],
                "finished_at": prov["finished_at"],
                "headline": head["verdict"],
                "best": head["best"],
                "comparison": head["comparison"],
                "counts": head["counts"],
            }
        ),
    )
    build_index(root)
    log.info("report of run %s written to %s", run_id, report)
    return report


def build_index(reports_root: Path | str) -> Path:
    """<reports_root>/index.html: every run with a summary.json, newest first, with its best
    accuracy per method and a trend plot across runs (from two runs on)."""
    root = Path(reports_root).resolve()
    runs, unreadable = [], []
    for summary in sorted(root.glob("*/summary.json")):
        try:
            s = read_json(summary)
            if not isinstance(s, dict):
                raise TypeError("not a JSON object")
        except (OSError, ValueError, TypeError) as err:
            unreadable.append(f"{summary.parent.name}: {err}")
            continue
        s["best"] = s.get("best") if isinstance(s.get("best"), dict) else {}
        s["run_id"] = summary.parent.name
        s["href"] = f"./{quote(summary.parent.name)}/{quote(str(s.get('report') or 'report.html'))}"
        runs.append(s)
    # ISO times in UTC sort as strings; runs without a time go last, then by id
    runs.sort(key=lambda s: (str(s.get("finished_at") or s.get("started_at") or ""), s["run_id"]))
    trend = plots.trend(runs)
    runs.reverse()
    methods = [m for m in METHOD_LABELS if any(m in (r.get("best") or {}) for r in runs)]
    html = (
        _env()
        .get_template("index.html")
        .render(
            runs=runs,
            methods=methods,
            unreadable=unreadable,
            trend=Markup(trend) if trend else None,
        )
    )
    return write_text(root / "index.html", html)
