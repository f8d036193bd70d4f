"""Inference with LoRA merged vs unmerged vs the bare model, and what the tokenization
cache saves: two small benchmarks of `loraflow bench`."""

from __future__ import annotations

import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from bench.common import load_model, ms_per_example


def bench_inference(source: str, batch: dict, repeats: int, device: str) -> list[dict[str, Any]]:
    """ms per example at batch 1 and batch BATCH: bare model, LoRA unmerged, LoRA merged."""
    from lora_core.inject import inject_lora, merge_lora, unwrap_lora

    torch.manual_seed(0)
    model = load_model(source).eval().to(device)
    sizes = (1, len(batch["input_ids"]))

    def rows(variant: str) -> list[dict[str, Any]]:
        return [
            {
                "model": source,
                "variant": variant,
                "batch": n,
                "ms_per_example": ms_per_example(model, batch, n, repeats, device),
            }
            for n in sizes
        ]

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
