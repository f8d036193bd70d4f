"""Benchmarks: what LoRA costs and saves per training step and at inference, and what the
tokenization cache saves. Writes `bench/results/bench.json` and `bench/results/bench.md`.

    loraflow bench            # MiniLM (embedded) and DistilBERT-base dimensions
    loraflow bench --quick    # tiny DistilBERT only, seconds

Timing inputs are real IMDB reviews tokenized to `SEQ_LEN` tokens. Weights of the
DistilBERT-base-sized model are random (the hub is not reachable here): step time and
memory do not depend on weight values.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

SEQ_LEN = 128
BATCH = 16


def _model(source: str):
    from transformers import DistilBertConfig, DistilBertForSequenceClassification

    from tasks.models import load_classifier

    if source == "distilbert-base-dims":  # DistilBERT-base shapes, random weights
        return DistilBertForSequenceClassification(DistilBertConfig(num_labels=2))
    return load_classifier(source)


def _batch(texts: list[str], n: int) -> dict[str, torch.Tensor]:
    from tasks.models import load_tokenizer

    tok = load_tokenizer("embedded-minilm")  # the uncased WordPiece vocab every model here uses
    enc = tok(texts[:n], truncation=True, max_length=SEQ_LEN, padding="max_length", return_tensors="pt")
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


def bench_train_step(source: str, method: str, batch: dict, repeats: int) -> dict[str, Any]:
    """One AdamW step (forward, backward, clip, update) on a batch of BATCH x SEQ_LEN."""
    from lora_core.accounting import count_parameters
    from lora_core.inject import freeze_all_but, head_module_names, inject_lora

    torch.manual_seed(0)
    model = _model(source).train()
    if method == "lora":
        inject_lora(model, "qkvo", rank=16, alpha=16)
    elif method == "linear_probe":
        freeze_all_but(model, head_module_names(model))
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5)
    labels = torch.zeros(len(batch["input_ids"]), dtype=torch.long)

    def step():
        loss = model(**batch, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()

    seconds = _timed(step, repeats)
    counts = count_parameters(model)
    # Optimizer state is a closed-form function of the trainable count (AdamW: 2 moments).
    return {"model": source, "method": method, "ms_per_step": 1000 * seconds,
            "samples_per_second": len(labels) / seconds, "params_trainable": counts["trainable"],
            "params_total": counts["total"], "adam_state_bytes": 8 * counts["trainable"]}


def _ms_per_example(model, batch: dict, size: int, repeats: int) -> float:
    sub = {k: v[:size] for k, v in batch.items()}

    def forward():
        with torch.inference_mode():
            model(**sub)

    return 1000 * _timed(forward, repeats) / size


def bench_inference(source: str, batch: dict, repeats: int) -> list[dict[str, Any]]:
    """ms per example at batch 1 and batch BATCH: bare model, LoRA unmerged, LoRA merged."""
    from lora_core.inject import inject_lora, merge_lora, unwrap_lora

    torch.manual_seed(0)
    model = _model(source).eval()
    sizes = (1, len(batch["input_ids"]))
    rows = [{"model": source, "variant": "bare", "batch": n,
             "ms_per_example": _ms_per_example(model, batch, n, repeats)} for n in sizes]
    inject_lora(model, "qkvo", rank=16, alpha=16)
    for p in model.parameters():  # a non-zero update, as after training
        if p.requires_grad:
            torch.nn.init.normal_(p, std=0.02)
    model.eval()
    for variant in ("unmerged", "merged"):
        if variant == "merged":
            merge_lora(model)
        rows += [{"model": source, "variant": f"lora {variant}", "batch": n,
                  "ms_per_example": _ms_per_example(model, batch, n, repeats)} for n in sizes]
    unwrap_lora(model)
    return rows


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


def markdown(results: dict[str, Any]) -> str:
    lines = [f"# loraflow benchmark ({results['machine']['when']})", "",
             (f"Machine: {results['machine']['cpu']}, {results['machine']['threads']} torch "
              f"threads, device {results['machine']['device']}; batch {BATCH} x {SEQ_LEN} tokens."),
             "",
             ("`distilbert-base-dims` is DistilBERT-base's architecture with random weights (the hub "
              "is out of reach); timings do not depend on weight values. Adam state = 8 bytes per "
              "trainable parameter (two fp32 moments), computed from the counts."),
             "",
             "## Training step (AdamW)", "",
             "| model | method | ms/step | samples/s | trainable | Adam state |",
             "| --- | --- | ---: | ---: | ---: | ---: |"]
    for r in results["train_step"]:
        lines.append(f"| {r['model']} | {r['method']} | {r['ms_per_step']:.1f} | "
                     f"{r['samples_per_second']:.1f} | {r['params_trainable']:,} | "
                     f"{r['adam_state_bytes'] / 2**20:.1f} MiB |")
    lines += ["", "## Inference", "", "| model | variant | batch | ms/example |", "| --- | --- | ---: | ---: |"]
    for r in results["inference"]:
        lines.append(f"| {r['model']} | {r['variant']} | {r['batch']} | {r['ms_per_example']:.2f} |")
    t = results["tokenize"]
    lines += ["", "## Tokenization cache", "",
              (f"{t['examples']:,} real reviews at {t['max_length']} tokens: cold "
               f"{t['cold_seconds']:.2f} s, cache hit {t['cache_hit_seconds']:.2f} s."), ""]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="loraflow bench")
    parser.add_argument("--quick", action="store_true", help="tiny DistilBERT only")
    parser.add_argument("--out", default="bench/results")
    parser.add_argument("--data", default=os.environ.get("LORAFLOW_DATA", "../shared/data/imdb"))
    args = parser.parse_args(argv)

    import pandas as pd

    data_dir = Path(args.data)
    texts = pd.read_parquet(data_dir / "test.parquet", columns=["text"])["text"].sample(
        n=BATCH, random_state=0).tolist()
    batch = _batch(texts, BATCH)
    models = ["tiny-distilbert"] if args.quick else ["embedded-minilm", "distilbert-base-dims"]
    repeats = 3 if args.quick else 5
    results: dict[str, Any] = {
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "device": "cpu", "python": sys.version.split()[0], "torch": torch.__version__,
                    "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
        "train_step": [bench_train_step(m, method, batch, repeats) for m in models
                       for method in ("full_finetune", "lora", "linear_probe")],
        "inference": [row for m in models for row in bench_inference(m, batch, repeats)],
        "tokenize": bench_tokenize_cache(data_dir, 200 if args.quick else 2000),
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "bench.json").write_text(json.dumps(results, indent=2) + "\n")
    (out / "bench.md").write_text(markdown(results))
    print(markdown(results))
    print(f"wrote {out / 'bench.json'} and {out / 'bench.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
