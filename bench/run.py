"""Benchmarks: loraflow against what users would pick instead, per training step and end
to end, plus what merging LoRA does to inference and what the tokenization cache saves.
Writes `bench.json` and `bench.md` into --out (default bench/results).

    loraflow bench                       # embedded MiniLM on real IMDB reviews (CPU)
    loraflow bench --device cuda --out bench/results/gpu   # adds DistilBERT-base dimensions
    loraflow bench --quick --out /tmp/b  # tiny random DistilBERT, tiny data: a plumbing check

Sections (each in its own module): per step (bench/step.py), end to end (bench/e2e.py),
inference merged vs bare and the tokenization cache (here), GPU throughput (bench/flops.py).
Timing inputs are real IMDB reviews. Weights of `distilbert-base-dims` are random (the
hub is not reachable here): step time and memory do not depend on weight values.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

BATCH = 16
SEQ_LEN = {"full": 128, "quick": 32}
log = logging.getLogger(__name__)
ROUNDS = {"full": 10, "quick": 2}  # per-step rounds, interleaved across contenders
INFERENCE_REPEATS = {"full": 5, "quick": 3}


def load_model(source: str):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from tasks.models import load_classifier

    if source == "distilbert-base-dims":  # DistilBERT-base shapes, random weights
        return DistilBertForSequenceClassification(DistilBertConfig(num_labels=2))
    return load_classifier(source)


def real_batch(data_dir: Path, seq_len: int) -> dict[str, torch.Tensor]:
    """BATCH test reviews, each truncated or padded to exactly `seq_len` tokens: every
    contender sees the same (BATCH, seq_len) input."""
    import pandas as pd

    from tasks.models import load_tokenizer

    texts = pd.read_parquet(data_dir / "test.parquet", columns=["text"])["text"].sample(
        n=BATCH, random_state=0).tolist()
    tok = load_tokenizer("embedded-minilm")  # the uncased WordPiece vocab every model here uses
    enc = tok(texts, truncation=True, max_length=seq_len, padding="max_length",
              return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def _timed(fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds of `fn()` over `repeats` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _ms_per_example(model, batch: dict, size: int, repeats: int, device: str) -> float:
    sub = {k: v[:size].to(device) for k, v in batch.items()}

    def forward():
        with torch.inference_mode():
            model(**sub)
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    return 1000 * _timed(forward, repeats) / size


def bench_inference(source: str, batch: dict, repeats: int, device: str) -> list[dict[str, Any]]:
    """ms per example at batch 1 and batch BATCH: bare model, LoRA unmerged, LoRA merged."""
    from lora_core.inject import inject_lora, merge_lora, unwrap_lora

    torch.manual_seed(0)
    model = load_model(source).eval().to(device)
    sizes = (1, len(batch["input_ids"]))

    def rows(variant: str) -> list[dict[str, Any]]:
        return [{"model": source, "variant": variant, "batch": n,
                 "ms_per_example": _ms_per_example(model, batch, n, repeats, device)}
                for n in sizes]

    out = rows("bare")
    inject_lora(model, "qkvo", rank=16, alpha=16)
    model.to(device)
    for p in model.parameters():  # a non-zero update, as after training
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    model.eval()
    out += rows("lora unmerged")
    merge_lora(model)
    out += rows("lora merged")
    unwrap_lora(model)
    return out


def bench_tokenize_cache(data_dir: Path, n_train: int) -> dict[str, Any]:
    """The tokenize step on real reviews: a cold build, then a cache hit in a new run."""
    from tasks.config import preset_config
    from tasks.data import download_dataset
    from tasks.pipeline import prepare_run
    from tasks.tokenize import tokenize_dataset

    config = preset_config("cpu", data=str(data_dir), train_size=n_train, test_size=n_train // 2)
    with tempfile.TemporaryDirectory() as tmp:
        out = {}
        for label in ("cold", "cache_hit"):
            paths = prepare_run(config, f"bench-{label}", Path(tmp), Path(tmp) / "reports")
            download_dataset(config, paths)
            start = time.perf_counter()
            tokenize_dataset(config, paths)
            out[f"{label}_seconds"] = time.perf_counter() - start
    out.update(examples=n_train + n_train // 2, max_length=config.max_length)
    return out


def machine(device: str) -> dict[str, Any]:
    import peft
    import transformers

    from tasks.evaluate import cpu_has_native_bf16

    cuda = device.startswith("cuda")
    return {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
            "threads": torch.get_num_threads(), "cpu_native_bf16": cpu_has_native_bf16(),
            "device": device, "device_name": torch.cuda.get_device_name(device) if cuda else None,
            "python": sys.version.split()[0], "torch": torch.__version__,
            "transformers": transformers.__version__, "peft": peft.__version__,
            "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}


def run_all(data_dir: Path, mode: str, device: str) -> dict[str, Any]:
    from bench.e2e import bench_e2e, e2e_config
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
