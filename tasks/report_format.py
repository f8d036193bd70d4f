"""How the report writes numbers (Jinja filters of the page) and the comparison table as
Markdown. Every formatter takes whatever a stored record holds and shows "—" for a value
that is missing or not a number, so odd records never break the page."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

from tasks.report_data import METHOD_LABELS, as_float


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


def markdown_table(rows: list[dict[str, Any]]) -> str:
    headers = [
        "Variant",
        "Method",
        "Accuracy (95% CI)",
        "F1",
        "Trainable params",
        "Train time",
        "Samples/s",
        "Peak memory",
        "Artifact",
        "Inference / example",
        "Status",
    ]
    body = []
    for r in rows:
        acc = fmt_acc(r["accuracy"])
        if r["accuracy_ci_low"] is not None and r["accuracy_ci_high"] is not None:
            acc += f" [{fmt_acc(r['accuracy_ci_low'])}, {fmt_acc(r['accuracy_ci_high'])}]"
        params = fmt_int(r["params_trainable"])
        if r["trainable_share"] is not None:
            params += f" ({fmt_pct(r['trainable_share'])})"
        latency = fmt_ms(r["inference_ms_per_example"])
        if r["latency_unmerged_ms"] is not None:
            latency = f"merged {fmt_ms(r['latency_merged_ms'])}, unmerged {fmt_ms(r['latency_unmerged_ms'])}"
        body.append(
            [
                r["variant"],
                METHOD_LABELS.get(r["method"], r["method"]),
                acc,
                fmt_float(r["f1"]),
                params,
                fmt_seconds(r["train_seconds"]),
                fmt_float(r["samples_per_second"], 1),
                fmt_bytes(r["peak_memory_bytes"]),
                fmt_bytes(r["artifact_bytes"]),
                latency,
                r["status"],
            ]
        )

    def cell(text: Any) -> str:  # a pipe or newline inside a cell would break the table
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    lines += ["| " + " | ".join(cell(c) for c in row) + " |" for row in body]
    return "\n".join(lines) + "\n"


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
}
