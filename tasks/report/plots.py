"""The report's figures: matplotlib (Agg, no pyplot state) rendered to inline SVG strings.

Byte-stable on purpose, so the same stored run gives the same page: a fixed
`svg.hashsalt`, no date in the metadata, text as <text> (not glyph paths), and every id
prefixed per figure so several SVGs can live in one HTML page without their ids
colliding. Colours and labels are the methods' own (tasks/registry.py), the same in every
figure. Every function takes plain numbers (lists of dicts) and returns an SVG string, or
None when there is nothing to draw.
"""

from __future__ import annotations

import io
import math
import re
import textwrap
from typing import Any

import matplotlib as mpl
import numpy as np
from matplotlib.figure import Figure

from tasks import registry

UNKNOWN_COLOR = "#444444"
LINESTYLES = ("-", "--", ":", "-.")  # several lines of one method: one style each
MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*")


def method_color(method: str) -> str:
    m = registry.METHODS.get(method)
    return m.color if m else UNKNOWN_COLOR


def method_label(method: str) -> str:
    m = registry.METHODS.get(method)
    return m.label if m else method


_RC = {
    "svg.hashsalt": "loraflow",
    "svg.fonttype": "none",
    "font.family": "sans-serif",
    "font.size": 9,
    "axes.titlesize": 10,
    "axes.labelsize": 9,
    "legend.fontsize": 8,
    "xtick.labelsize": 8,
    "ytick.labelsize": 8,
    "axes.spines.top": False,
    "axes.spines.right": False,
    "axes.edgecolor": "#777777",
    "axes.grid": True,
    "grid.color": "#e6e6e6",
    "grid.linewidth": 0.8,
    "axes.axisbelow": True,
    "legend.frameon": False,
    "figure.facecolor": "white",
}
_ID_REF = re.compile(r'(\bid="|href="#|url\(#)([^")]+)')
_OUTSIDE = {"loc": "upper left", "bbox_to_anchor": (1.01, 1.0)}  # legends never hide data
MAX_POINTS = 800  # per line; a paper-preset loss curve has ~5,000 steps


def to_svg(fig: Figure, name: str) -> str:
    """The figure as an inline <svg> element (no XML prolog, no metadata, ids prefixed)."""
    buf = io.StringIO()
    with mpl.rc_context(_RC):
        fig.savefig(buf, format="svg", metadata={"Date": None, "Creator": None})
    text = buf.getvalue()
    text = text[text.index("<svg") :]
    text = re.sub(r"\s*<metadata>.*?</metadata>", "", text, flags=re.DOTALL)
    text = _ID_REF.sub(lambda m: f"{m.group(1)}{name}-{m.group(2)}", text)
    return text.replace("<svg ", f'<svg role="img" aria-label="{name}" ', 1).strip()


def _figure(width: float, height: float, ncols: int = 1, nrows: int = 1):
    with mpl.rc_context(_RC):
        fig = Figure(figsize=(width, height), layout="constrained")
        axes = fig.subplots(nrows, ncols, squeeze=False)
    return fig, axes


def _thin(x: np.ndarray, y: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """At most MAX_POINTS points: bin means, so the curve keeps its shape."""
    if len(x) <= MAX_POINTS:
        return x, y
    bins = np.array_split(np.arange(len(x)), MAX_POINTS)
    return np.array([x[b].mean() for b in bins]), np.array([y[b].mean() for b in bins])


def accuracy_ci(rows: list[dict[str, Any]]) -> str | None:
    """Accuracy of each successful variant with its 95% bootstrap interval."""
    rows = [r for r in rows if r.get("accuracy") is not None]
    if not rows:
        return None
    rows = sorted(rows, key=lambda r: (r["accuracy"], r["label"]))
    with mpl.rc_context(_RC):
        fig, ax = _figure(6.4, max(3.4, 0.9 + 0.3 * len(rows)))
        ax = ax[0, 0]
        for i, r in enumerate(rows):
            color = method_color(r["method"])
            ci = r.get("ci")
            if ci and None not in ci:
                ax.errorbar(
                    r["accuracy"],
                    i,
                    xerr=[[r["accuracy"] - ci[0]], [ci[1] - r["accuracy"]]],
                    fmt="o",
                    color=color,
                    capsize=3,
                    markersize=5,
                )
            else:
                ax.plot(r["accuracy"], i, "o", color=color, markersize=5)
        ax.axvline(0.5, color="#bbbbbb", linestyle="--", linewidth=1)
        ax.set_yticks(range(len(rows)), [r["label"] for r in rows])
        ax.set_xlabel("test accuracy (95% bootstrap interval); dashed: chance")
        ax.grid(axis="y", visible=False)
        _method_legend(ax, {r["method"] for r in rows})
        return to_svg(fig, "accuracy")


def _method_legend(ax, methods: set[str]) -> None:
    """One entry per method present, outside the axes so it never hides a point."""
    from matplotlib.lines import Line2D

    handles = [
        Line2D([], [], marker="o", linestyle="", color=m.color, label=m.label)
        for m in registry.METHODS.values()
        if m.name in methods
    ]
    if handles:
        ax.legend(handles=handles, **_OUTSIDE)


def _styles(series: list[dict[str, Any]]) -> list[tuple[str, str]]:
    """(colour, linestyle) per series: the method's colour, one style per series of it."""
    seen: dict[str, int] = {}
    out = []
    for s in series:
        k = seen.get(s["method"], 0)
        seen[s["method"]] = k + 1
        out.append((method_color(s["method"]), LINESTYLES[k % len(LINESTYLES)]))
    return out


SMOOTH_ABOVE = 30  # points per line; above this the per-step loss gets a moving average


def smoothing_window(points: int) -> int | None:
    """Moving-average window for a loss line of `points` (after thinning), or None."""
    return max(3, points // 25) if points > SMOOTH_ABOVE else None


def loss_caption(series: list[dict[str, Any]]) -> str:
    """What `loss_curves` draws for these series, in words (the caption must match it)."""
    points = [min(len(s["steps"]), MAX_POINTS) for s in series if len(s["steps"]) > 0]
    smoothed = [n for n in points if smoothing_window(n)]
    thinned = any(len(s["steps"]) > MAX_POINTS for s in series)
    raw = (f"the logged loss (means of {MAX_POINTS} equal bins of steps)" if thinned
           else "the loss at every logged step")
    if smoothed and len(smoothed) == len(points):
        return (f"Faint lines: {raw}; solid lines: its moving average over 1/25 of the "
                "points.")
    if smoothed:
        return (f"Lines with more than {SMOOTH_ABOVE} logged steps: faint {raw} and a solid "
                "moving average; the others join their logged steps.")
    return f"Each line joins {raw} (too few steps to smooth)."


def loss_curves(series: list[dict[str, Any]]) -> str | None:
    """Training loss per optimizer step, one line per variant in its method's colour: a
    faint line for every logged step and a solid moving average when there are many
    (`loss_caption` says which)."""
    series = [s for s in series if len(s["steps"]) > 0]
    if not series:
        return None
    with mpl.rc_context(_RC):
        fig, ax = _figure(6.4, 3.4)
        ax = ax[0, 0]
        for s, (color, style) in zip(series, _styles(series)):
            x, y = _thin(np.asarray(s["steps"], float), np.asarray(s["values"], float))
            window = smoothing_window(len(y))
            if window:  # noisy per-step losses: the trend over the raw trace
                smooth = np.convolve(y, np.ones(window) / window, mode="valid")
                ax.plot(x, y, color=color, alpha=0.25, linewidth=0.8, linestyle=style)
                ax.plot(x[window - 1 :], smooth, color=color, linewidth=1.6, linestyle=style,
                        label=s["label"])
            else:
                ax.plot(x, y, color=color, linewidth=1.4, linestyle=style,
                        marker="." if len(y) < 10 else None, label=s["label"])
        ax.set_xlabel("optimizer step")
        ax.set_ylabel("training loss")
        ax.legend(**_OUTSIDE)
        return to_svg(fig, "loss")


def eval_curves(series: list[dict[str, Any]]) -> str | None:
    """Validation accuracy after each epoch, one line per trained variant."""
    series = [s for s in series if len(s["epochs"]) > 0]
    if not any(len(s["epochs"]) > 1 for s in series):  # one epoch: the table says it all
        return None
    with mpl.rc_context(_RC):
        fig, ax = _figure(6.4, 3.4)
        ax = ax[0, 0]
        for s, (color, style) in zip(series, _styles(series)):
            ax.plot(s["epochs"], s["values"], marker="o", color=color, linestyle=style,
                    linewidth=1.4, label=s["label"])
        ax.set_xlabel("epoch")
        ax.set_ylabel("validation accuracy")
        ax.xaxis.get_major_locator().set_params(integer=True)
        ax.legend(**_OUTSIDE)
        return to_svg(fig, "eval")


# Where a point's label may go, in points from the point: beside it (right, left), above,
# below, then further up or down, where a thin leader line ties it to its point.
_LABEL_SPOTS = ((6, 4, "left", "bottom"), (6, -4, "left", "top"), (-6, 4, "right", "bottom"),
                (-6, -4, "right", "top"), (0, 9, "center", "bottom"), (0, -9, "center", "top"),
                *((dx, dy, ha, "bottom" if dy > 0 else "top")
                  for lift in (18, 30) for dy in (lift, -lift)
                  for dx, ha in ((0, "center"), (6, "left"), (-6, "right"))))


def place_labels(fig: Figure, ax, points: list[tuple[float, float, str]],
                 marker_pt: float = 6) -> list[tuple[float, float, float, float]]:
    """Label each point where the label covers no marker and no other label and stays
    inside the axes: the first free spot of _LABEL_SPOTS, else the least crowded one.
    Returns the boxes (display pixels) of the markers, then of the labels."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.text import Text

    canvas = FigureCanvasAgg(fig)
    canvas.draw()  # settles the constrained layout, so display positions are final
    renderer = canvas.get_renderer()
    frame = ax.get_window_extent(renderer)
    pad = marker_pt / 2 * fig.dpi / 72 + 2  # a marker's radius in display pixels, and a gap
    markers = [ax.transData.transform((x, y)) for x, y, _ in points]
    taken = [(mx - pad, my - pad, mx + pad, my + pad) for mx, my in markers]

    def area(a, b) -> float:
        return max(0.0, min(a[2], b[2]) - max(a[0], b[0])) * max(0.0, min(a[3], b[3]) - max(a[1], b[1]))

    def clash(box) -> float:
        """How much `box` leaves the axes (weighted heavily) or covers markers and labels."""
        x0, y0, x1, y1 = box
        out = max(0.0, frame.x0 - x0) + max(0.0, x1 - frame.x1) + max(0.0, frame.y0 - y0) \
            + max(0.0, y1 - frame.y1)
        return out * 1000 + sum(area(box, b) for b in taken)

    leaders: list[tuple[float, float, float, float]] = []  # thin boxes around leader lines

    for (x, y, text), (mx, my) in zip(points, markers):
        best = None
        for dx, dy, ha, va in _LABEL_SPOTS:
            leader = {"arrowprops": {"arrowstyle": "-", "color": "#999999", "linewidth": 0.6,
                                     "shrinkA": 0, "shrinkB": 4}} if abs(dy) > 9 else {}
            label = ax.annotate(text, (x, y), xytext=(dx, dy), textcoords="offset points",
                                ha=ha, va=va, fontsize=7, color="#444444", **leader)
            label.set_in_layout(False)  # placed after layout: must not move the axes
            label.update_positions(renderer)
            e = Text.get_window_extent(label, renderer)  # the text's box, not its leader
            box = (e.x0, e.y0, e.x1, e.y1)
            line = None
            if leader:  # from the marker's edge to the label's near edge
                lx = mx + dx * fig.dpi / 72
                line = (min(mx, lx) - 1, my + pad if dy > 0 else e.y1,
                        max(mx, lx) + 1, e.y0 if dy > 0 else my - pad)
            cost = clash(box) + sum(area(box, b) for b in leaders) + (
                clash(line) + sum(area(line, b) for b in taken[len(markers):]) if line else 0)
            if best is None or cost < best[0]:
                if best:
                    best[1].remove()
                best = (cost, label, box, line)
            else:
                label.remove()
            if cost == 0:
                break
        taken.append(best[2])
        if best[3]:
            leaders.append(best[3])
    return taken


def accuracy_vs_params(rows: list[dict[str, Any]]) -> str | None:
    """Accuracy against the number of trained parameters (log scale); each label sits
    where it hides no other point or label and stays inside the plot."""
    rows = [
        r for r in rows if r.get("accuracy") is not None and (r.get("params_trainable") or 0) > 0
    ]
    if not rows:
        return None
    with mpl.rc_context(_RC):
        fig, ax = _figure(6.4, 3.4)
        ax = ax[0, 0]
        rows = sorted(rows, key=lambda r: (r["params_trainable"], r["label"]))
        for r in rows:
            ax.plot(r["params_trainable"], r["accuracy"], "o", markersize=6,
                    color=method_color(r["method"]))
        ax.set_xscale("log")
        ax.set_xlabel("trainable parameters (log scale)")
        ax.set_ylabel("test accuracy")
        ax.margins(x=0.3, y=0.25)
        _method_legend(ax, {r["method"] for r in rows})
        place_labels(fig, ax, [(r["params_trainable"], r["accuracy"], r["label"]) for r in rows])
        return to_svg(fig, "params")


def cost_bars(rows: list[dict[str, Any]]) -> str | None:
    """Training time and peak memory per variant, side by side. Drawn only when a model was
    trained (baselines alone would compare milliseconds of fitting); memory only if measured."""
    rows = [
        r
        for r in rows
        if r.get("train_seconds") is not None or r.get("peak_memory_bytes") is not None
    ]
    if not any(m.trained for m in map(registry.METHODS.get, (r["method"] for r in rows)) if m):
        return None
    rows = sorted(rows, key=lambda r: r["label"])
    panels = [
        ("train_seconds", 1.0, "training time (s)"),
        ("peak_memory_bytes", 1e6, "peak memory (MB)"),
    ]
    panels = [p for p in panels if any(r.get(p[0]) is not None for r in rows)]
    with mpl.rc_context(_RC):
        fig, axes = _figure(6.8, max(3.4, 0.9 + 0.3 * len(rows)), ncols=len(panels))
        y = np.arange(len(rows))
        colors = [method_color(r["method"]) for r in rows]
        for i, (ax, (key, scale, label)) in enumerate(zip(axes[0], panels)):
            values = [(r.get(key) or 0) / scale for r in rows]
            ax.barh(y, values, color=colors, height=0.6)
            ax.set_xlabel(label)
            ax.grid(axis="y", visible=False)
            ax.set_yticks(y, [r["label"] for r in rows] if i == 0 else [])
            for yi, r in zip(y, rows):
                if r.get(key) is None:
                    ax.text(
                        0.02,
                        yi,
                        "not measured",
                        va="center",
                        fontsize=7,
                        color="#888888",
                        transform=ax.get_yaxis_transform(),
                    )
        return to_svg(fig, "cost")


def accuracy_vs_rank(rows: list[dict[str, Any]]) -> str | None:
    """LoRA validation accuracy (the selection criterion) against rank, one line per target
    set and learning rate, mean over seeds. Drawn when some line has more than one rank."""
    rows = [r for r in rows if r.get("validation_accuracy") is not None
            and r.get("rank") is not None]
    lines: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        lines.setdefault(f"{r.get('targets')}, lr {r.get('lr')}", []).append(r)
    if not any(len({r["rank"] for r in rs}) > 1 for rs in lines.values()):
        return None
    color = method_color("lora")
    with mpl.rc_context(_RC):
        fig, ax = _figure(6.4, 3.4)
        ax = ax[0, 0]
        for i, key in enumerate(sorted(lines)):
            rs = sorted(lines[key], key=lambda r: r["rank"])
            ax.plot([r["rank"] for r in rs], [r["validation_accuracy"] for r in rs],
                    marker=MARKERS[i % len(MARKERS)], color=color,
                    linestyle=LINESTYLES[i % len(LINESTYLES)], label=key)
        ax.set_xscale("log", base=2)
        all_ranks = sorted({r["rank"] for r in rows})
        ax.set_xticks(all_ranks, [str(k) for k in all_ranks])
        ax.set_xlabel("LoRA rank r (log scale)")
        ax.set_ylabel("validation accuracy (mean over seeds)")
        ax.legend(title="targets, learning rate", **_OUTSIDE)
        return to_svg(fig, "rank")


def confusion_grid(items: list[dict[str, Any]]) -> str | None:
    """Small multiples of 2x2 confusion matrices [[tn, fp], [fn, tp]]."""
    items = [i for i in items if i.get("matrix")]
    if not items:
        return None
    ncols = min(6, len(items))  # the page shows this figure across the full width
    nrows = math.ceil(len(items) / ncols)
    # titles wrapped to the panel's width (about 24 characters at 8 pt), never cut
    titles = [textwrap.fill(i["label"], 24, break_on_hyphens=False) for i in items]
    lines = max(t.count("\n") + 1 for t in titles)
    with mpl.rc_context(_RC):
        fig, axes = _figure(1.75 * ncols + 0.4, (1.75 + 0.15 * lines) * nrows + 0.2,
                            ncols=ncols, nrows=nrows)
        for ax in axes.flat:
            ax.set_visible(False)
        for ax, item, title in zip(axes.flat, items, titles):
            m = np.asarray(item["matrix"], dtype=float)
            ax.set_visible(True)
            ax.imshow(m / max(m.sum(), 1), cmap="Blues", vmin=0, vmax=1)
            for (i, j), v in np.ndenumerate(m):
                ax.text(
                    j,
                    i,
                    f"{int(v):,}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="white" if v / max(m.sum(), 1) > 0.5 else "#222222",
                )
            ax.set_xticks([0, 1], ["neg", "pos"])
            ax.set_yticks([0, 1], ["neg", "pos"])
            ax.grid(False)
            ax.set_title(title, fontsize=8)
            ax.tick_params(length=0)
        fig.supxlabel("predicted", fontsize=8)
        fig.supylabel("true label", fontsize=8)
        return to_svg(fig, "confusion")


def token_histogram(stats: dict[str, Any], max_length: int | None) -> str | None:
    """Token lengths per split (before truncation) with the truncation limit marked."""
    splits = [
        (s, v) for s, v in sorted(stats.items()) if isinstance(v, dict) and v.get("histogram")
    ]
    if not splits:
        return None
    colors = {"train": "#0072B2", "validation": "#009E73", "test": "#E69F00"}
    with mpl.rc_context(_RC):
        fig, ax = _figure(6.4, 3.0)
        ax = ax[0, 0]
        for split, v in splits:
            edges, counts = v["histogram"]["bin_edges"], v["histogram"]["counts"]
            share = v.get("truncated_share")
            label = split + (f" ({share:.1%} truncated)" if share is not None else "")
            ax.stairs(
                counts, edges, color=colors.get(split), linewidth=1.4, label=label, fill=False
            )
        if max_length:
            ax.axvline(
                max_length,
                color="#c0392b",
                linestyle="--",
                linewidth=1,
                label=f"max_length = {max_length}",
            )
        ax.set_xlabel("tokens per review (with special tokens)")
        ax.set_ylabel("reviews")
        ax.legend(**_OUTSIDE)
        return to_svg(fig, "tokens")


def trend(runs: list[dict[str, Any]]) -> str | None:
    """Test accuracy of each method's selected configuration across runs (oldest left), so
    scheduled runs show drift. Lines that coincide stay distinguishable by marker and style."""
    if len(runs) < 2:
        return None
    with mpl.rc_context(_RC):
        fig, ax = _figure(7.2, 3.4)
        ax = ax[0, 0]
        x = np.arange(len(runs))
        drawn = 0
        for m in registry.METHODS.values():
            y = [((r.get("selected") or {}).get(m.name) or {}).get("accuracy") for r in runs]
            if any(v is not None for v in y):
                ax.plot(x, [np.nan if v is None else v for v in y], color=m.color,
                        marker=MARKERS[drawn % len(MARKERS)], markersize=7 - drawn % 3,
                        linestyle=LINESTYLES[drawn % len(LINESTYLES)], label=m.label)
                drawn += 1
        ax.set_xticks(x, [r.get("when") or r["run_id"][-12:] for r in runs], rotation=30,
                      ha="right")
        ax.set_ylabel("test accuracy (selected configuration)")
        ax.legend(**_OUTSIDE)
        return to_svg(fig, "trend")
