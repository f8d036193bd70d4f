"""How the report writes numbers (the page's Jinja filters), and the comparison table's
columns, defined once for the page, comparison.md and comparison.csv. Every formatter
takes whatever a stored record holds and shows "—" for a value that is missing or not a
number, so odd records never break the page."""

from __future__ import annotations

import html
import json
import math
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import numpy as np


def as_float(v: Any) -> float | None:
    """A finite number from a record; anything else (missing, text, NaN) becomes None."""
    if isinstance(v, bool) or not isinstance(v, (int, float, np.integer, np.floating)):
        return None
    return None if math.isnan(v) or math.isinf(v) else float(v)


def as_int(v: Any) -> int | None:
    x = as_float(v)
    return None if x is None else int(x)


def fmt_int(v: Any) -> str:
    return "—" if as_float(v) is None else f"{int(v):,}"


def fmt_pct(frac: Any) -> str:
    """A fraction as a percentage with enough digits to tell small shares apart."""
    x = as_float(frac)
    if x is None:
        return "—"
    v = 100 * x
    digits = 1 if abs(v) >= 1 or v == 0 else (2 if abs(v) >= 0.1 else 3)
    return f"{v:,.{digits}f}%"


def fmt_acc(v: Any) -> str:
    return "—" if as_float(v) is None else f"{100 * v:.1f}%"


def fmt_float(v: Any, digits: int = 3) -> str:
    return "—" if as_float(v) is None else f"{v:,.{digits}f}"


def fmt_seconds(v: Any) -> str:
    s = as_float(v)
    if s is None:
        return "—"
    if s < 60:
        return f"{s:.1f} s" if s >= 1 else f"{s * 1000:.0f} ms"
    if s < 3600:
        return f"{int(s // 60)} min {int(s % 60):02d} s"
    return f"{int(s // 3600)} h {int(s % 3600 // 60):02d} min"


def fmt_bytes(v: Any) -> str:
    b = as_float(v)
    if b is None:
        return "—"
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if b >= size:
            return f"{b / size:,.1f} {unit}"
    return f"{int(b)} B"


def fmt_ms(v: Any) -> str:
    x = as_float(v)
    if x is None:
        return "—"
    return "< 0.01 ms" if 0 < x < 0.01 else (f"{x:.2f} ms" if x < 10 else f"{x:,.1f} ms")


def fmt_p(v: Any) -> str:
    p = as_float(v)
    return "—" if p is None else ("p < 0.001" if p < 0.001 else f"p = {p:.3f}")


def fmt_points(v: Any) -> str:
    """An accuracy difference in percentage points, signed, with a true minus sign."""
    x = as_float(v)
    return "—" if x is None else f"{100 * x:+.1f}".replace("-", "−")


def fmt_time(v: Any) -> str:
    """An ISO timestamp as `2026-11-20 09:00 UTC` (unparseable text is shown as is)."""
    try:
        t = datetime.fromisoformat(str(v))
    except ValueError:
        return str(v)
    if t.tzinfo is not None:
        return t.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")
    return t.strftime("%Y-%m-%d %H:%M")


def fmt_json(v: Any, limit: int = 300) -> str:
    text = v if isinstance(v, str) else json.dumps(v, sort_keys=True, default=str)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def fmt_sd(v: Any) -> str:
    """A standard deviation of accuracies, in points."""
    x = as_float(v)
    return "—" if x is None else f"± {100 * x:.1f}"


# --- the comparison table ------------------------------------------------------------------

@dataclass(frozen=True)
class Column:
    """One column of the comparison table: its header, the row keys its CSV holds, the
    cell text, and an optional second line (the page shows it small, Markdown after)."""

    header: str
    keys: tuple[str, ...]
    text: Callable[[dict[str, Any]], str]
    detail: Callable[[dict[str, Any]], str | None] = lambda row: None
    numeric: bool = True


def _accuracy_detail(row: dict[str, Any]) -> str | None:
    if row.get("n", 0) > 1:
        return f"{fmt_sd(row.get('accuracy_sd'))} over {row['n']} seeds"
    if row.get("accuracy_ci_low") is not None and row.get("accuracy_ci_high") is not None:
        return f"{fmt_acc(row['accuracy_ci_low'])} – {fmt_acc(row['accuracy_ci_high'])}"
    return None


def _latency_detail(row: dict[str, Any]) -> str | None:
    if row.get("latency_unmerged_ms") is None:
        return None
    parts = [f"unmerged {fmt_ms(row.get('latency_unmerged_ms'))}"]
    if row.get("latency_base_ms") is not None:
        parts.append(f"base {fmt_ms(row['latency_base_ms'])}")
    return " · ".join(parts)


def _try_detail(row: dict[str, Any]) -> str | None:
    """Which try wrote the row's record(s) and when: a cleared and re-run variant shows
    `try 2`, so its new timings are not mistaken for the first run's."""
    tries = sorted(set(row.get("attempts") or []))
    if not tries:
        return None
    text = f"try {tries[0]}" if len(tries) == 1 else f"tries {', '.join(map(str, tries))}"
    if not row.get("finished_at"):
        return text
    try:
        when = datetime.fromisoformat(row["finished_at"]).astimezone(UTC)
    except (TypeError, ValueError):
        return text
    return f"{text} · {when:%d %b %H:%M} UTC"


COLUMNS = (
    Column("Configuration", ("name", "method", "label"), lambda r: r["label"],
           lambda r: None if r["label"].startswith(r["method_label"]) else r["method_label"],
           numeric=False),
    Column("Input", ("input", "input_cut_share", "input_share_read"),
           lambda r: r.get("input") or "—",
           lambda r: (f"{fmt_pct(r['input_cut_share'])} of test reviews cut"
                      if r.get("input_cut_share") else None), numeric=False),
    Column("Seeds", ("n", "n_total", "seeds"), lambda r: f"{r['n']}/{r['n_total']}"),
    Column("Validation acc.", ("validation_accuracy", "validation_sd"),
           lambda r: fmt_acc(r.get("validation_accuracy")),
           lambda r: fmt_sd(r.get("validation_sd")) if r.get("n", 0) > 1 else None),
    Column("Test acc.", ("accuracy", "accuracy_sd", "accuracy_ci_low", "accuracy_ci_high"),
           lambda r: fmt_acc(r.get("accuracy")), _accuracy_detail),
    Column("Test F1", ("f1",), lambda r: fmt_float(r.get("f1"))),
    Column("Trainable", ("params_trainable", "params_total", "trainable_share"),
           lambda r: fmt_int(r.get("params_trainable")),
           lambda r: (f"{fmt_pct(r['trainable_share'])} of {fmt_int(r.get('params_total'))}"
                      if r.get("trainable_share") is not None else None)),
    Column("Train time", ("train_seconds", "seconds_per_step", "samples_per_second"),
           lambda r: fmt_seconds(r.get("train_seconds")),
           lambda r: (f"{fmt_seconds(r['seconds_per_step'])} / step"
                      if r.get("seconds_per_step") is not None else None)),
    Column("Peak memory", ("peak_memory_bytes",), lambda r: fmt_bytes(r.get("peak_memory_bytes"))),
    Column("Artifact", ("artifact_bytes",), lambda r: fmt_bytes(r.get("artifact_bytes"))),
    Column("Latency / example", ("inference_ms_per_example", "latency_merged_ms",
                                   "latency_unmerged_ms", "latency_base_ms"),
           lambda r: fmt_ms(r.get("inference_ms_per_example")), _latency_detail),
    Column("Status", ("status", "attempts", "finished_at", "error", "reason"),
           lambda r: r["status"], _try_detail, numeric=False),
)


def _safe(text: Any) -> str:
    """Markup escaped, and no spreadsheet formula: a stored error message is untrusted."""
    text = html.escape(str(text), quote=False).replace("\n", " ")
    return "'" + text if text[:1] in ("=", "+", "-", "@") and not _numeric(text) else text


def _numeric(text: str) -> bool:
    try:
        float(text)
        return True
    except ValueError:
        return False


def markdown_table(rows: list[dict[str, Any]]) -> str:
    """comparison.md: one line per configuration, the second lines in parentheses."""
    def cell(column: Column, row: dict[str, Any]) -> str:
        detail = column.detail(row)
        text = column.text(row) + (f" ({detail})" if detail else "")
        return _safe(text).replace("|", "\\|")

    lines = ["| " + " | ".join(c.header for c in COLUMNS) + " |",
             "|" + "|".join("---:" if c.numeric else "---" for c in COLUMNS) + "|"]
    lines += ["| " + " | ".join(cell(c, r) for c in COLUMNS) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def csv_table(rows: list[dict[str, Any]]) -> str:
    """comparison.csv: the raw numbers behind every column, one line per configuration."""
    import pandas as pd

    keys = list(dict.fromkeys(k for c in COLUMNS for k in c.keys))

    def value(v: Any) -> Any:
        if isinstance(v, list):
            v = " ".join(str(x) for x in v)
        return _safe(v) if isinstance(v, str) else v

    frame = pd.DataFrame([{k: value(r.get(k)) for k in keys} for r in rows], columns=keys)
    return frame.to_csv(index=False, lineterminator="\n")


FILTERS = {
    "count": fmt_int,
    "pct": fmt_pct,
    "acc": fmt_acc,
    "num": fmt_float,
    "seconds": fmt_seconds,
    "bytes": fmt_bytes,
    "ms": fmt_ms,
    "pvalue": fmt_p,
    "compact": fmt_json,
    "points": fmt_points,
    "when": fmt_time,
    "sd": fmt_sd,
}
