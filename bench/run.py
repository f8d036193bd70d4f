"""Benchmarks: loraflow against what users would pick instead, per training step and end
to end, plus what merging LoRA does to inference and what the tokenization cache saves.
Writes `bench.json` and `bench.md` into --out (default bench/results).

    loraflow bench                       # embedded MiniLM on real IMDB reviews (CPU)
    loraflow bench --device cuda --out bench/results/gpu   # adds DistilBERT-base dimensions
    loraflow bench --quick --out /tmp/b  # tiny random DistilBERT, tiny data: a plumbing check

Sections (each in its own module): per step (bench/step.py), end to end (bench/e2e.py),
inference merged vs bare and the tokenization cache (bench/inference.py), GPU throughput
(bench/flops.py); the helpers they share are bench/common.py. This module is the command.
Timing inputs are real IMDB reviews. Weights of `distilbert-base-dims` are random (the
hub is not reachable here): step time and memory do not depend on weight values.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

import torch

from bench.common import BATCH, SEQ_LEN, machine, real_batch

log = logging.getLogger(__name__)
ROUNDS = {"full": 10, "quick": 2}  # per-step rounds, interleaved across contenders
INFERENCE_REPEATS = {"full": 5, "quick": 3}


def run_all(data_dir: Path, mode: str, device: str) -> dict[str, Any]:
    from bench.e2e import bench_e2e, e2e_config
    from bench.inference import bench_inference, bench_tokenize_cache
    from bench.step import bench_steps

    quick = mode == "quick"
    batch = real_batch(data_dir, SEQ_LEN[mode])
    models = ["tiny-distilbert"] if quick else ["embedded-minilm", "distilbert-base-dims"]
    # DistilBERT-base's full fine-tuning takes seconds per step on a few CPU cores: per-step
    # rounds on it only where a GPU makes them cheap
    step_models = models if quick or device.startswith("cuda") else models[:1]
    results: dict[str, Any] = {"machine": machine(device), "mode": mode,
                               "batch": BATCH, "seq_len": SEQ_LEN[mode]}
    results["train_step"] = [row for m in step_models
                             for row in bench_steps(m, batch, ROUNDS[mode], device)]
    results["inference"] = [row for m in models for row in
                            bench_inference(m, batch, INFERENCE_REPEATS[mode], device)]
    results["tokenize"] = bench_tokenize_cache(data_dir, 200 if quick else 2000)
    try:  # last, and on its own: a contender that cannot run here loses nothing measured above
        results["end_to_end"] = bench_e2e(e2e_config(str(data_dir), quick), device)
    except Exception as err:  # noqa: BLE001 - recorded in bench.json and bench.md
        log.exception("end-to-end benchmark failed")
        results["end_to_end"] = {"error": f"{type(err).__name__}: {err}"}
    return results


def main(argv: list[str] | None = None) -> int:
    from bench.report import markdown

    parser = argparse.ArgumentParser(prog="loraflow bench")
    parser.add_argument("--quick", action="store_true",
                        help="tiny random DistilBERT, 64/32 rows, 2 rounds: seconds")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--data", default=os.environ.get("LORAFLOW_DATA", "../shared/data/imdb"),
                        help="a folder with IMDB's train.parquet and test.parquet")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:<i>")
    args = parser.parse_args(argv)
    data_dir = Path(args.data)
    if not (data_dir / "train.parquet").exists() or not (data_dir / "test.parquet").exists():
        parser.error(f"--data {data_dir}: expected train.parquet and test.parquet there")
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        parser.error(f"--device {args.device}: torch sees no CUDA device")

    results = run_all(data_dir, "quick" if args.quick else "full", args.device)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
