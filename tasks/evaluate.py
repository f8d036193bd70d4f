"""Evaluation of a sequence classifier on tokenized examples: probabilities, scores and
inference latency. Also the per-batch padding that training shares.

Input frames are what `tasks.tokenize.load_split` returns: `input_ids` (unpadded, with
special tokens), `length` and `label`. Nothing here calls a tokenizer (tokens come from
the run's cache) and every evaluation covers the whole frame (the seed notebook looked at
the first 500 test examples only).
"""

from __future__ import annotations

import contextlib
import functools
import os
import resource
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING, Any, Self

import numpy as np
import pandas as pd
import torch

from tasks.metrics import classification_scores

if TYPE_CHECKING:
    from tasks.job import MergeableMethod

# --- batches --------------------------------------------------------------------------------

def pad_batch(sequences: Sequence[Sequence[int]],
              pad_id: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-pad to the longest sequence of this batch: (input_ids, attention_mask), both
    (B, T) int64 with T = max length in the batch, so no batch pays for the global maximum."""
    width = max(len(s) for s in sequences)
    ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(sequences), width), dtype=torch.long)
    for i, seq in enumerate(sequences):
        ids[i, : len(seq)] = torch.as_tensor(np.asarray(seq, dtype=np.int64))
        mask[i, : len(seq)] = 1
    return ids, mask


def sorted_batches(lengths: Sequence[int], batch_size: int) -> list[np.ndarray]:
    """Row indices in batches of similar length (longest first), for inference: sorting
    minimises padding; callers scatter results back to the original order."""
    order = np.argsort(-np.asarray(lengths), kind="stable")
    return [order[i : i + batch_size] for i in range(0, len(order), batch_size)]


def pad_id_of(model: torch.nn.Module) -> int:
    pad = getattr(getattr(model, "config", None), "pad_token_id", None)
    return int(pad) if pad is not None else 0  # masked out anyway; any valid id will do


@functools.cache
def cpu_has_native_bf16() -> bool:
    """AVX512-BF16 or AMX: bf16 matrix products in hardware (Linux /proc/cpuinfo)."""
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


# On an NVIDIA H200, a training step at batch 16 x 128 (2,048 tokens) was faster in fp32
# than under bf16 autocast for every model and method measured (16.7 vs 19.4 ms, MiniLM
# LoRA; 18.9 vs 20.2 ms, DistilBERT-base full fine-tuning: bench/results/gpu/bench.md): so
# small a step is bound by kernel launches, and autocast adds casts. Larger batches are
# bound by the matmuls, where bf16 tensor cores do twice TF32's work.
CUDA_FP32_MAX_TOKENS = 2048


def autocast_dtype(precision: str, device: str | torch.device,
                   tokens_per_batch: int | None = None) -> torch.dtype | None:
    """The autocast dtype of a precision setting on a device; None means fp32.

    `auto`: on CPUs, bf16 where it is native, fp32 elsewhere (emulated bf16 is slower than
    fp32); on CUDA GPUs with bf16, bf16 when a batch holds more than 2,048 tokens (or the
    shape is not given) and fp32 (TF32 matmuls, tasks.train) up to that, where fp32 was
    measured faster (CUDA_FP32_MAX_TOKENS). `fp16` needs CUDA: it trains with loss scaling."""
    kind = torch.device(device).type
    if precision == "fp32":
        return None
    if precision == "fp16":
        if kind != "cuda":
            raise ValueError(f"precision fp16 needs a CUDA device, got {device}")
        return torch.float16
    if precision == "bf16":
        if kind == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"precision bf16: {device} has no bf16 support; use fp16 or auto")
        return torch.bfloat16
    if precision != "auto":
        raise ValueError(f"unknown precision {precision!r}; expected auto, fp32, bf16 or fp16")
    if kind == "cuda":
        small = tokens_per_batch is not None and tokens_per_batch <= CUDA_FP32_MAX_TOKENS
        return torch.bfloat16 if torch.cuda.is_bf16_supported() and not small else None
    return torch.bfloat16 if kind == "cpu" and cpu_has_native_bf16() else None


def precision_label(dtype: torch.dtype | None) -> str:
    return {None: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}[dtype]


def resolve_precision(precision: str, device: str | torch.device,
                      tokens_per_batch: int | None = None) -> str:
    """What a precision setting (`auto` included) is on `device` for batches of
    `tokens_per_batch` tokens: fp32, bf16 or fp16. The one place `auto` is decided for a
    variant; tasks.variants carries the answer in the Job."""
    return precision_label(autocast_dtype(precision, device, tokens_per_batch))


def autocast(device: str | torch.device,
             dtype: torch.dtype | None) -> contextlib.AbstractContextManager:
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


@contextlib.contextmanager
def eval_mode(model: torch.nn.Module) -> Iterator[torch.nn.Module]:
    """Eval mode and no grad for the block; the previous mode is restored afterwards."""
    was_training = model.training
    model.eval()
    try:
        with torch.inference_mode():
            yield model
    finally:
        model.train(was_training)


# --- predictions and scores ------------------------------------------------------------------

def predict_logits(model: torch.nn.Module, frame: pd.DataFrame, batch_size: int,
                   device: str | torch.device, dtype: torch.dtype | None = None) -> np.ndarray:
    """Logits (N, num_labels) float32 in the rows' original order."""
    if len(frame) == 0:
        raise ValueError("cannot evaluate on an empty frame (0 rows)")
    ids_col, pad = frame["input_ids"].tolist(), pad_id_of(model)
    out: np.ndarray | None = None
    with eval_mode(model):
        for idx in sorted_batches(frame["length"].to_numpy(), batch_size):
            ids, mask = pad_batch([ids_col[i] for i in idx], pad)
            with autocast(device, dtype):
                logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits
            logits = logits.float().cpu().numpy()
            if out is None:
                out = np.empty((len(frame), logits.shape[1]), dtype=np.float32)
            out[idx] = logits  # scatter back to the original row order
    assert out is not None
    return out


def softmax_positive(logits: np.ndarray) -> np.ndarray:
    """P(label = 1) from (N, 2) logits, computed stably in float64."""
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    p = np.exp(z)
    return p[:, 1] / p.sum(axis=1)


def predict_proba(model: torch.nn.Module, frame: pd.DataFrame, batch_size: int,
                  device: str | torch.device, dtype: torch.dtype | None = None) -> np.ndarray:
    """Probability of the positive class for every row of `frame`, in its order."""
    return softmax_positive(predict_logits(model, frame, batch_size, device, dtype))


def scores_from_logits(logits: np.ndarray, labels: np.ndarray) -> dict[str, Any]:
    """Accuracy, F1 and mean cross-entropy of (N, 2) logits against integer labels."""
    labels = np.asarray(labels, dtype=np.int64)
    z = logits.astype(np.float64)
    z = z - z.max(axis=1, keepdims=True)
    log_probs = z - np.log(np.exp(z).sum(axis=1, keepdims=True))
    loss = float(-log_probs[np.arange(len(labels)), labels].mean())
    scores = classification_scores(labels, (softmax_positive(logits) >= 0.5).astype(np.int64))
    return {"accuracy": scores["accuracy"], "f1": scores["f1"], "loss": loss}


def evaluate(model: torch.nn.Module, frame: pd.DataFrame, batch_size: int,
             device: str | torch.device) -> dict[str, Any]:
    """{"accuracy", "f1", "loss"} on every row of `frame`."""
    logits = predict_logits(model, frame, batch_size, device)
    return scores_from_logits(logits, frame["label"].to_numpy())


# --- latency -----------------------------------------------------------------------------------

def measure_latency_ms(model: torch.nn.Module, frame: pd.DataFrame, device: str | torch.device,
                       n_examples: int = 32, batch_size: int = 1, warmup_batches: int = 3,
                       dtype: torch.dtype | None = None) -> float:
    """Milliseconds per example of a forward pass, averaged over the first `n_examples`
    rows (real lengths) in batches of `batch_size`, after `warmup_batches` untimed batches.
    CPU threads are left as they are; on CUDA the clock waits for the device."""
    if n_examples < 1 or batch_size < 1:
        raise ValueError(f"n_examples and batch_size must be >= 1, got {n_examples} "
                         f"and {batch_size}")
    rows = frame["input_ids"].tolist()[:n_examples]
    if not rows:
        raise ValueError("cannot measure latency on an empty frame (0 rows)")
    pad = pad_id_of(model)
    batches = [pad_batch(rows[i : i + batch_size], pad) for i in range(0, len(rows), batch_size)]
    batches = [(ids.to(device), mask.to(device)) for ids, mask in batches]
    cuda = torch.device(device).type == "cuda"

    def run(selection: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        for ids, mask in selection:
            with autocast(device, dtype):
                model(input_ids=ids, attention_mask=mask)
        if cuda:
            torch.cuda.synchronize(device)

    with eval_mode(model):
        run([batches[i % len(batches)] for i in range(warmup_batches)])
        start = time.perf_counter()
        run(batches)
        elapsed = time.perf_counter() - start
    return 1000.0 * elapsed / len(rows)


LATENCY_EXAMPLES = 32
LATENCY_ROUNDS = 3


def latency_fields(model: torch.nn.Module, frame: pd.DataFrame, device: str,
                   dtype: torch.dtype | None = None,
                   adapter: MergeableMethod | None = None,
                   rounds: int = LATENCY_ROUNDS) -> dict[str, Any]:
    """Batch-1 latency per example: the median of `rounds` timings of the first 32 rows.

    With `adapter` (a method module with `merge(model)` and a `bare(model)` context that
    removes the adaptation): unmerged, then merged and the bare architecture timed
    alternately, so drift in machine load hits both; `inference_ms_per_example` is then
    the deployable, merged model's. Leaves such a model merged."""
    n = min(LATENCY_EXAMPLES, len(frame))
    protocol = {"batch_size": 1, "examples": n, "rounds": rounds, "statistic": "median",
                "device": str(device), "precision": precision_label(dtype)}

    def timed() -> float:
        return measure_latency_ms(model, frame, device, n, dtype=dtype)

    if adapter is None:
        median = float(np.median([timed() for _ in range(rounds)]))
        return {"inference_ms_per_example": median, "latency_protocol": protocol}
    unmerged = [timed() for _ in range(rounds)]
    adapter.merge(model)
    merged, base = [], []
    for _ in range(rounds):
        merged.append(timed())
        with adapter.bare(model):
            base.append(timed())
    ms = {k: float(np.median(v)) for k, v in (("base", base), ("unmerged", unmerged),
                                               ("merged", merged))}
    return {"inference_ms_per_example": ms["merged"], "latency_ms": ms,
            "latency_protocol": protocol}


# --- memory -------------------------------------------------------------------------------------

def _rss_bytes() -> int:
    """Current resident set size (Linux /proc), 0 where unavailable."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        return 0


def _max_rss_bytes() -> int:
    """The process's lifetime peak RSS (ru_maxrss: KiB on Linux, bytes on macOS)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak) if sys.platform == "darwin" else int(peak) * 1024


class PeakMemory:
    """Peak memory of a block. On CUDA: `torch.cuda.max_memory_allocated` after a reset
    (kind `cuda_max_allocated`). On CPU: how far the process RSS rose above its level at
    the start (kind `cpu_peak_rss_increase`), from a 10 ms sampler and, when the process
    set a new lifetime peak inside the block, the exact `ru_maxrss`. Memory the allocator
    reuses from earlier work in the same process is not counted: a lower bound."""

    def __init__(self, device: str | torch.device, interval_s: float = 0.01) -> None:
        self.device = torch.device(device)
        self.kind = "cuda_max_allocated" if self.device.type == "cuda" else "cpu_peak_rss_increase"
        self.peak_bytes: int | None = None
        self._interval = interval_s
        self._stop = threading.Event()

    def _sample(self) -> None:
        while not self._stop.wait(self._interval):
            self._max = max(self._max, _rss_bytes())

    def __enter__(self) -> Self:
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            return self
        self._base = self._max = _rss_bytes()
        self._lifetime = _max_rss_bytes()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.device.type == "cuda":
            self.peak_bytes = int(torch.cuda.max_memory_allocated(self.device))
            return
        self._stop.set()
        self._thread.join()
        top = max(self._max, _rss_bytes())
        lifetime = _max_rss_bytes()
        if lifetime > self._lifetime:  # a new process peak was set inside the block
            top = max(top, lifetime)
        self.peak_bytes = max(0, top - self._base)
