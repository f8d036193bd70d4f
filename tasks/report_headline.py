"""The headline of a report: the verdict computed from the stored numbers (best LoRA vs
best full fine-tuning) and the paired tests between them (tasks.stats). Only numbers that
exist are used; when one side is missing the verdict says why, it never estimates."""

from __future__ import annotations

from typing import Any

from tasks.report_data import METHOD_LABELS, as_float
from tasks.report_format import fmt_pct
from tasks.stats import mcnemar, paired_bootstrap

ERROR_IN_HEADLINE = 200  # characters of an error message quoted in the verdict


def _best(variants: list[dict[str, Any]], method: str) -> dict[str, Any] | None:
    ok = [v for v in variants if v["method"] == method and v["status"] == "ok"]
    return min(ok, key=lambda v: (-v["accuracy"], v["variant"])) if ok else None  # ties: by name


def _lora_label(v: dict[str, Any]) -> str:
    if v.get("rank") is None:
        return f"LoRA ({v['variant']})"
    return f"LoRA r={v['rank']} on {v.get('targets') or '?'}"


def _why_absent(variants: list[dict[str, Any]], method: str) -> str:
    label = METHOD_LABELS[method]
    others = [v for v in variants if v["method"] == method]
    if not others:
        return f"no {label} variant ran"
    parts = []
    for v in others:
        err = str(v.get("error") or "no error recorded")
        err = err if len(err) <= ERROR_IN_HEADLINE else err[: ERROR_IN_HEADLINE - 1] + "…"
        parts.append(f"{v['variant']} {v['status']} ({err})")
    return f"{label} did not succeed: " + "; ".join(parts)


def _paired(a: dict[str, Any], b: dict[str, Any]) -> dict[str, Any] | None:
    """McNemar and the paired bootstrap of a vs b on the test rows both predicted."""
    pa, pb = a.get("predictions"), b.get("predictions")
    if pa is None or pb is None:
        return None
    joined = pa[["row", "label", "pred"]].merge(
        pb[["row", "label", "pred"]], on="row", suffixes=("_a", "_b")
    )
    if joined.empty or not (joined.label_a == joined.label_b).all():
        return None  # different test sets: a paired test would be meaningless
    ca = (joined.pred_a == joined.label_a).to_numpy()
    cb = (joined.pred_b == joined.label_b).to_numpy()
    return {
        "mcnemar": mcnemar(ca, cb),
        "bootstrap": paired_bootstrap(ca, cb),
        "rows": len(joined),
        "a": a["variant"],
        "b": b["variant"],
    }


def headline(variants: list[dict[str, Any]]) -> dict[str, Any]:
    """The verdict, computed only from numbers that exist, plus the paired tests."""
    counts: dict[str, int] = {}
    for v in variants:
        counts[v["status"]] = counts.get(v["status"], 0) + 1
    best = {
        m: {"variant": b["variant"], "accuracy": b["accuracy"]}
        for m in METHOD_LABELS
        if (b := _best(variants, m))
    }
    out: dict[str, Any] = {
        "counts": counts,
        "best": best,
        "comparison": None,
        "paired": None,
        "details": [],
    }
    ok = [v for v in variants if v["status"] == "ok"]
    if not ok:
        tally = ", ".join(f"{n} {s}" for s, n in sorted(counts.items())) or "no variants stored"
        out["verdict"] = (
            f"No variant finished successfully in this run ({tally}), so there is nothing to compare."
        )
        return out
    lora, full = _best(variants, "lora"), _best(variants, "full_finetune")
    if lora and full:
        cmp: dict[str, Any] = {
            "lora": lora["variant"],
            "full": full["variant"],
            "accuracy_ratio": lora["accuracy"] / full["accuracy"] if full["accuracy"] else None,
        }
        text = f"{_lora_label(lora)} reached "
        text += (
            f"{fmt_pct(cmp['accuracy_ratio'])} of full fine-tuning accuracy"
            if cmp["accuracy_ratio"] is not None
            else "an accuracy where full fine-tuning scored 0"
        )
        text += f" ({100 * lora['accuracy']:.1f}% vs {100 * full['accuracy']:.1f}%)"
        trained, total = as_float(lora.get("params_trainable")), as_float(lora.get("params_total"))
        if trained is not None and total:
            cmp["trainable_share"] = trained / total
            text += f" while training {fmt_pct(cmp['trainable_share'])} of the parameters"
        sl, sf = as_float(lora.get("seconds_per_step")), as_float(full.get("seconds_per_step"))
        if sl and sf:
            cmp["speedup_per_step"] = sf / sl
            text += (
                f", {sf / sl:.1f}× faster per step"
                if sf >= sl
                else f", {sl / sf:.1f}× slower per step"
            )
        out["verdict"], out["comparison"] = text + ".", cmp
        out["paired"] = _paired(lora, full)
        if out["paired"] is None:
            out["details"].append(
                "No paired test: the predictions of both variants on the same "
                "test rows are not available."
            )
    else:
        reasons = [
            _why_absent(variants, m)
            for m, b in (("lora", lora), ("full_finetune", full))
            if b is None
        ]
        out["verdict"] = (
            "No comparison of LoRA and full fine-tuning could be made: " + "; ".join(reasons) + "."
        )
    top = min(ok, key=lambda v: (-v["accuracy"], v["variant"]))
    out["top"] = {"variant": top["variant"], "method": top["method"], "accuracy": top["accuracy"]}
    return out
