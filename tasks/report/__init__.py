"""The report of a run: one self-contained HTML page, the comparison table as CSV and
Markdown, a `summary.json` that the index of all runs reads, and that index.

load (the stored files) → compute (configurations, selection on validation, the verdict)
→ render (this module: figures, the page, the files). The output is byte-stable: the same
stored files give the same bytes (no build time, seeded bootstrap, fixed SVG ids).
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

from tasks import failures, registry
from tasks.paths import read_json, report_slug, safe_run_id, write_json, write_text
from tasks.paths import reports_root as default_reports_root
from tasks.registry import Variant
from tasks.report import plots
from tasks.report.compute import (
    Configuration,
    comparison_sentences,
    configurations,
    headline,
    select,
)
from tasks.report.format import COLUMNS, FILTERS, as_int, csv_table, fmt_time, markdown_table
from tasks.report.load import StoredRun, load_stored_run
from tasks.report.regression import fingerprint, since_last_comparable
from tasks.report.sections import (
    class_balance,
    expectation_rows,
    parameter_breakdown,
    provenance,
    tokenizer_name,
    training_series,
)

log = logging.getLogger(__name__)
TEMPLATES = Path(__file__).parent / "templates"
__all__ = ["build_index", "build_report"]


def _env() -> Environment:
    env = Environment(loader=FileSystemLoader(str(TEMPLATES)), autoescape=True,
                      trim_blocks=True, lstrip_blocks=True, keep_trailing_newline=True)
    env.filters.update(FILTERS)
    env.globals.update(method_label=plots.method_label, methods=registry.METHODS,
                       columns=COLUMNS)
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


def _label(name: str) -> str:
    try:
        return Variant.parse(name).label()
    except ValueError:
        return name


def _figures(run: StoredRun, configs: list[Configuration]) -> list[dict[str, Any]]:
    ok_rows = [c.row for c in configs if c.row["n"] > 0]
    seed_rows = [row for c in configs for row in (c.seed_rows or [c.row]) if row["n"] > 0]
    chosen = [c for c in configs if c.selected]
    labels = {r.variant: _label(r.variant) for r in run.records}
    curves = [r for c in chosen if registry.METHODS.get(c.method)
              and registry.method(c.method).trained for r in c.ok]
    loss, evals = training_series(curves, labels)
    confusion = [{"label": labels.get(r.variant, r.variant), "matrix": r.confusion_matrix}
                 for c in chosen for r in c.ok[:1]]
    with_ci = [{**r, "label": labels.get(r["variants"][0], r["label"]),
                "ci": [r["accuracy_ci_low"], r["accuracy_ci_high"]]} for r in seed_rows]
    figures = [
        _draw("Test accuracy with 95% intervals",
              "Every successful variant; bootstrap over test reviews (test-set noise only).",
              plots.accuracy_ci, with_ci),
        _draw("Test accuracy against trainable parameters",
              "One point per configuration (mean over seeds); methods that train nothing are "
              "left out.", plots.accuracy_vs_params, ok_rows),
        _draw("Training loss per step",
              "The selected configuration of each trained method, every seed. "
              + plots.loss_caption(loss), plots.loss_curves, loss),
        _draw("Validation accuracy per epoch",
              "The selected configurations; evaluated on the whole validation subset after "
              "each epoch.", plots.eval_curves, evals),
        _draw("Training time and peak memory", "Per configuration, mean over seeds.",
              plots.cost_bars, ok_rows),
        _draw("Validation accuracy against LoRA rank",
              "The criterion the LoRA configuration was selected by; mean over seeds.",
              plots.accuracy_vs_rank, ok_rows),
        _draw("Confusion matrices on test",
              "Each method's selected configuration (first seed). Rows: true label; "
              "columns: predicted.", plots.confusion_grid, confusion, wide=True),
    ]
    return [f for f in figures if f]


def _summary(run: StoredRun, head: dict[str, Any], prov: dict[str, Any],
             since: dict[str, Any], fp: dict[str, Any], run_dir: Path) -> dict[str, Any]:
    config = run.config or {}
    return _clean({
        "run_dir": str(run_dir), "fingerprint": fp, "since_last_comparable": since,
        "run_id": run.run_id, "report": "report.html", "preset": config.get("preset"),
        "model": config.get("model"), "started_at": prov["started_at"],
        "finished_at": prov["finished_at"], "headline": " ".join(head["sentences"]),
        "selection": "validation", "selected": head["selected"],
        "comparison": head["comparison"], "claims": head["claims"], "counts": head["counts"],
        "random_weights": head["banner"] is not None,
    })


def build_report(run_dir: Path | str, reports_root: Path | str | None = None) -> Path:
    """Write <reports_root>/<slug of run id>/report.html, comparison.csv, comparison.md and
    summary.json from the stored files of `run_dir`, then refresh the index."""
    run_dir = Path(run_dir).resolve()
    if not run_dir.is_dir():
        raise FileNotFoundError(f"run folder {run_dir} does not exist")
    run_id = safe_run_id(run_dir.name)
    root = Path(reports_root) if reports_root is not None else default_reports_root()
    out = root.resolve() / report_slug(run_id)

    run = load_stored_run(run_dir)
    configs = configurations(run)
    chosen = select(configs)
    head = headline(run, configs, chosen)
    if head["comparison"]:
        head["comparison_text"] = comparison_sentences(head["comparison"], "LoRA",
                                                       "full fine-tuning")
    prov = provenance(run_id, run.config, run.records, run.environment)
    fp = fingerprint(run, run_dir)
    since = since_last_comparable(run, run_dir, root.resolve(), fp, prov["finished_at"])
    tokens = run.tokens or {}
    stats = tokens.get("stats") if isinstance(tokens.get("stats"), dict) else {}
    breakdown, pb = parameter_breakdown(run.records)
    rows = [c.row | {"selected": c.selected, "seed_rows": c.seed_rows} for c in configs]
    data = {"run_id": run_id, "config": run.config, "validation": run.validation,
            "tokens": run.tokens, "records": [r.to_dict() for r in run.records],
            "comparison": [c.row for c in configs], "headline": head, "provenance": prov,
            "since_last_comparable": since, "missing": run.missing}
    failure = failures.read(run_id, root)  # a data step that stopped the run, if any
    html = _env().get_template("report.html").render(
        run_id=run_id, config=run.config or {}, rows=rows, head=head, prov=prov, run=run,
        since=since, fp=fp, stopped=failures.sentence(failure) if failure else None,
        figures=_figures(run, configs),
        token_fig=_draw("Token-length distribution",
                        "Lengths before truncation; reviews right of the dashed line are cut.",
                        plots.token_histogram, stats, as_int(tokens.get("max_length"))),
        token_stats=[(k, v) for k, v in sorted(stats.items()) if isinstance(v, dict)],
        tokenizer=tokenizer_name(run.tokens), breakdown=breakdown, pb=pb,
        balance=class_balance(run.validation), expectations=expectation_rows(run.validation),
        problems=[r for r in run.records if r.status not in ("ok", "not_applicable")
                  or r.problems],
        not_applicable=[r for r in run.records if r.status == "not_applicable"],
        notes=[r for r in run.records if r.notes], data=_clean(data))
    plain = [c.row for c in configs]
    write_text(out / "comparison.csv", csv_table(plain))
    write_text(out / "comparison.md", markdown_table(plain))
    report = write_text(out / "report.html", html)
    write_json(out / "summary.json", _summary(run, head, prov, since, fp, run_dir))
    build_index(root)
    log.info("report of run %s written to %s", run_id, report)
    return report


def build_index(reports_root: Path | str) -> Path:
    """<reports_root>/index.html: every run with a summary.json, newest first, with each
    method's selected configuration and a trend plot across runs (from two runs on)."""
    root = Path(reports_root).resolve()
    runs, unreadable = [], []
    for summary in sorted(root.glob("*/summary.json")):
        try:
            s = read_json(summary)
            if not isinstance(s, dict):
                raise ValueError("not a JSON object")
        except (OSError, ValueError) as err:
            unreadable.append(f"{summary.parent.name}: {err}")
            continue
        s["selected"] = s.get("selected") if isinstance(s.get("selected"), dict) else {}
        s["run_id"] = str(s.get("run_id") or summary.parent.name)
        s["href"] = f"./{quote(summary.parent.name)}/{quote(str(s.get('report') or 'report.html'))}"
        s["when"] = fmt_time(s["finished_at"]) if s.get("finished_at") else None
        runs.append(s)
    # ISO times in UTC sort as strings; runs without a time go last, then by id
    runs.sort(key=lambda s: (str(s.get("finished_at") or s.get("started_at") or ""), s["run_id"]))
    trend = plots.trend(runs)
    runs.reverse()
    html = _env().get_template("index.html").render(
        runs=runs, unreadable=unreadable, trend=Markup(trend) if trend else None)
    return write_text(root / "index.html", html)
