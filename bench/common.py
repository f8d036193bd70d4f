"""What the benchmarks share: the model and the batch every contender sees, a median
timer, and a description of the machine."""

from __future__ import annotations

import os
import platform
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

BATCH = 16
SEQ_LEN = {"full": 128, "quick": 32}


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

    texts = (
        pd.read_parquet(data_dir / "test.parquet", columns=["text"])["text"]
        .sample(n=BATCH, random_state=0)
        .tolist()
    )
    tok = load_tokenizer("embedded-minilm")  # the uncased WordPiece vocab every model here uses
    enc = tok(texts, truncation=True, max_length=seq_len, padding="max_length", return_tensors="pt")
    return {"input_ids": enc["input_ids"], "attention_mask": enc["attention_mask"]}


def timed(fn, repeats: int, warmup: int = 2) -> float:
    """Median seconds of `fn()` over `repeats` runs after `warmup` untimed ones."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def ms_per_example(model, batch: dict, size: int, repeats: int, device: str) -> float:
    sub = {k: v[:size].to(device) for k, v in batch.items()}

    def forward():
        with torch.inference_mode():
            model(**sub)
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    return 1000 * timed(forward, repeats) / size


def machine(device: str) -> dict[str, Any]:
    import peft
    import transformers

    from tasks.evaluate import cpu_has_native_bf16

    cuda = device.startswith("cuda")
    return {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "threads": torch.get_num_threads(),
        "cpu_native_bf16": cpu_has_native_bf16(),
        "device": device,
        "device_name": torch.cuda.get_device_name(device) if cuda else None,
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "transformers": transformers.__version__,
        "peft": peft.__version__,
        "when": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
    }
