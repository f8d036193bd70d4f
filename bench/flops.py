"""Achieved TFLOP/s of a full fine-tuning step against the GPU's bf16 dense peak.

Training FLOPs per step ~ 6 x parameters x tokens: 2 per parameter per token forward, 4
backward (Kaplan et al. 2020, section 2.1). It leaves out attention's score products
(small at 128 tokens) and counts the embedding tables as if they were matrix products,
so it is the usual rough model-FLOPs figure, not a hardware counter.

    python -m bench.flops bench/results/gpu/bench.json   # the table for a finished run
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

# Vendor datasheets, bf16 tensor-core throughput, dense (no 2:4 sparsity), in TFLOP/s.
# Patterns are tried in order against torch.cuda.get_device_name().
PEAK_BF16_DENSE_TFLOPS: tuple[tuple[str, str, float], ...] = (
    (r"\bH200\b", "H200", 989.0),
    (r"\bH100\b(?!.*\b(PCIe|NVL)\b)", "H100 SXM", 989.0),  # PCIe and NVL cards are slower
    (r"\bA100\b", "A100", 312.0),
    (r"\bL4\b", "L4", 121.0),
    (r"\bA10G\b", "A10G", 125.0),
)


def peak_bf16_tflops(device_name: str | None) -> tuple[str, float] | None:
    """(card, dense bf16 peak) for a known card name, else None (no guess)."""
    for pattern, card, peak in PEAK_BF16_DENSE_TFLOPS:
        if device_name and re.search(pattern, device_name):
            return card, peak
    return None


def achieved_tflops(params: int, tokens: int, seconds: float) -> float:
    """6 x params x tokens / seconds, in TFLOP/s."""
    return 6 * params * tokens / seconds / 1e12


def throughput_rows(results: dict[str, Any]) -> list[dict[str, Any]]:
    """One row per full fine-tuning step measured in `results` (a bench.json)."""
    peak = peak_bf16_tflops(results["machine"].get("device_name"))
    rows = []
    for r in results["train_step"]:
        if r["method"] != "full_finetune":
            continue
        tflops = achieved_tflops(r["params_total"], r["tokens_per_step"], r["ms_per_step"] / 1000)
        rows.append({"model": r["model"], "precision": r["precision"],
                     "ms_per_step": r["ms_per_step"], "tflops": tflops,
                     "peak_card": peak[0] if peak else None,
                     "peak_tflops": peak[1] if peak else None,
                     "share_of_peak": tflops / peak[1] if peak else None})
    return rows


def markdown_lines(results: dict[str, Any]) -> list[str]:
    rows = throughput_rows(results)
    name = results["machine"].get("device_name") or "unknown device"
    tokens = sorted({r["tokens_per_step"] for r in results["train_step"]})
    lines = [f"Achieved = 6 x parameters x tokens per step ({', '.join(map(str, tokens))}) / "
             "step time; peak = the card's bf16 tensor-core datasheet figure, dense, no "
             f"sparsity; device: {name}.", "",
             "| model | precision | ms/step | achieved TFLOP/s | peak TFLOP/s | share of peak |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        peak = (f"{r['peak_tflops']:.0f} ({r['peak_card']})" if r["peak_tflops"]
                else "not given (unknown card)")
        share = f"{100 * r['share_of_peak']:.1f}%" if r["share_of_peak"] is not None else "-"
        lines.append(f"| {r['model']} | {r['precision']} | {r['ms_per_step']:.2f} | "
                     f"{r['tflops']:.1f} | {peak} | {share} |")
    return lines


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print("usage: python -m bench.flops <bench.json>", file=sys.stderr)
        return 2
    print("\n".join(markdown_lines(json.loads(Path(args[0]).read_text()))))
    return 0


if __name__ == "__main__":
    sys.exit(main())
