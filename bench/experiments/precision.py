"""Does precision `auto` (bf16 autocast on a CUDA GPU with bf16 or a CPU with native bf16)
cost accuracy against fp32?

Compares two finished runs of the same configuration that differ only in `precision`:
for every variant both ran, validation and test accuracy side by side, and on test the
paired bootstrap interval of the difference and McNemar's test (the same rows, the same
seed, so the pairs isolate precision).

    loraflow run --preset cpu --methods lora full_finetune --precision fp32 --run-id cpu-fp32
    loraflow run --preset cpu --methods lora full_finetune --precision auto --run-id cpu-auto
    python -m bench.experiments.precision artifacts/runs/cpu-fp32 artifacts/runs/cpu-auto

or, from one prepared run, both at once: `python -m bench.experiments.precision_run`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import pandas as pd

from tasks.metrics import MetricsRecord
from tasks.report.stats import mcnemar, paired_bootstrap


def compare(fp32_run: Path, auto_run: Path) -> str:
    lines = [f"# Precision `auto` against `fp32` ({fp32_run.name} vs {auto_run.name})", "",
             "| variant | precision | validation acc. | test acc. | test difference auto − fp32 "
             "(95% paired bootstrap) | McNemar p | train s/step |",
             "| --- | --- | ---: | ---: | --- | ---: | ---: |"]
    for metrics in sorted((fp32_run / "results").glob("*/metrics.json")):
        name = metrics.parent.name
        other = auto_run / "results" / name / "metrics.json"
        if not other.exists():
            continue
        a, b = MetricsRecord.read(metrics), MetricsRecord.read(other)
        if not (a.ok and b.ok):
            continue
        pa = pd.read_parquet(metrics.parent / "predictions.parquet").sort_values("row")
        pb = pd.read_parquet(other.parent / "predictions.parquet").sort_values("row")
        ca, cb = (pa.pred == pa.label).to_numpy(), (pb.pred == pb.label).to_numpy()
        boot, test = paired_bootstrap(cb, ca), mcnemar(cb, ca)
        low, high = (100 * x for x in boot["diff_ci95"])
        for record, label in ((a, a.precision), (b, b.precision)):
            diff = (f"{100 * boot['diff']:+.1f} points [{low:+.1f}, {high:+.1f}]"
                    if record is b else "")
            p = f"{test['p_value']:.3f}" if record is b else ""
            lines.append(f"| {name} | {label} | {100 * record.validation_accuracy:.1f}% | "
                         f"{100 * record.accuracy:.1f}% | {diff} | {p} | "
                         f"{record.seconds_per_step:.3f} |")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.experiments.precision")
    parser.add_argument("fp32_run", type=Path)
    parser.add_argument("auto_run", type=Path)
    parser.add_argument("--out", type=Path, default=Path("bench/experiments/precision.md"))
    args = parser.parse_args(argv)
    text = compare(args.fp32_run, args.auto_run)
    args.out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
