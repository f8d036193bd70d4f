"""Per-step benchmark: one AdamW step of each contender on the same batch, in one process.

Contenders (same trainable set for every LoRA row: r=16, alpha 16 on the attention
projections q, k, v, o plus the classification head, as lora_core's `inject_lora` trains):
loraflow's LoRA at fp32 and at loraflow's default precision (`auto`), PEFT's LoRA at fp32
(its default) and under the same autocast as loraflow's `auto`, and full fine-tuning at
fp32 and `auto`. The step is the one tasks.train runs: forward under autocast, backward,
gradient clipping at 1.0, AdamW update (fused, with TF32 matmuls, on CUDA).

Rounds are interleaved (round 1: every contender once, round 2: ...) and each contender's
median is reported, so drift in machine load hits every contender alike.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from tasks import registry

WARMUP_STEPS = 2  # untimed: allocator, oneDNN/cuBLAS kernel selection


@dataclass(frozen=True)
class Contender:
    name: str  # e.g. "loraflow LoRA auto"
    implementation: str  # loraflow | PEFT
    method: str  # a registry method name
    precision: str  # the setting: fp32 or auto


def contenders() -> list[Contender]:
    lora, full = registry.method("lora").label, registry.method("full_finetune").label
    return [Contender(f"loraflow {lora} fp32", "loraflow", "lora", "fp32"),
            Contender(f"loraflow {lora} auto", "loraflow", "lora", "auto"),
            Contender(f"PEFT {lora} fp32", "PEFT", "lora", "fp32"),
            Contender(f"PEFT {lora} auto", "PEFT", "lora", "auto"),
            Contender(f"loraflow {full} fp32", "loraflow", "full_finetune", "fp32"),
            Contender(f"loraflow {full} auto", "loraflow", "full_finetune", "auto")]


def is_reference(row: dict[str, Any]) -> bool:
    """Ratios are against loraflow's LoRA at loraflow's default precision."""
    return (row["implementation"], row["method"], row["precision_setting"]) == (
        "loraflow", "lora", "auto")


def build_model(source: str, contender: Contender) -> torch.nn.Module:
    """The model with exactly the contender's parameters trainable."""
    from bench.common import load_model
    from lora_core.inject import TARGET_PRESETS, head_module_names, inject_lora

    torch.manual_seed(0)
    model = load_model(source)
    if contender.method == "full_finetune":
        return model.requires_grad_(True).train()
    if contender.implementation == "loraflow":
        inject_lora(model, "qkvo", rank=16, alpha=16)
        return model.train()
    from peft import LoraConfig, get_peft_model

    config = LoraConfig(r=16, lora_alpha=16, lora_dropout=0.0,
                        target_modules=TARGET_PRESETS[model.config.model_type]["qkvo"],
                        modules_to_save=head_module_names(model))  # the head loraflow trains
    return get_peft_model(model, config).train()


def step_fn(model: torch.nn.Module, batch: dict[str, torch.Tensor], precision: str,
            device: str) -> Callable[[], None]:
    """One training step of tasks.train's loop, synchronised on CUDA so the clock is true."""
    from tasks.evaluate import autocast, autocast_dtype
    from tasks.train import optimizer_options, use_tf32

    use_tf32(device)
    dtype = autocast_dtype(precision, device, tokens_per_batch=batch["input_ids"].numel())
    model.to(device)
    batch = {k: v.to(device) for k, v in batch.items()}
    labels = torch.zeros(len(batch["input_ids"]), dtype=torch.long, device=device)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-5, **optimizer_options(device))  # fused on CUDA

    def step() -> None:
        with autocast(device, dtype):
            loss = model(**batch, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if device.startswith("cuda"):
            torch.cuda.synchronize(device)

    return step


def bench_steps(source: str, batch: dict[str, torch.Tensor], rounds: int,
                device: str) -> list[dict[str, Any]]:
    """ms per step of every contender on `source`, median over interleaved rounds."""
    from tasks.evaluate import resolve_precision

    runs = []
    for c in contenders():
        model = build_model(source, c)
        trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        params = sum(p.numel() for p in model.parameters())  # PEFT: with its head copies
        runs.append((c, step_fn(model, batch, c.precision, device), trainable, params))
    for _, step, _, _ in runs:
        for _ in range(WARMUP_STEPS):
            step()
    times: dict[str, list[float]] = {c.name: [] for c, *_ in runs}
    for _ in range(rounds):
        for c, step, _, _ in runs:
            start = time.perf_counter()
            step()
            times[c.name].append(time.perf_counter() - start)
    tokens = int(batch["attention_mask"].sum())
    rows = []
    for c, _, trainable, params in runs:
        rows.append({"model": source, "name": c.name, "implementation": c.implementation,
                     "method": c.method, "precision_setting": c.precision,
                     "precision": resolve_precision(c.precision, device,
                                                    batch["input_ids"].numel()),
                     "ms_per_step": 1000 * statistics.median(times[c.name]),
                     "rounds": rounds, "params_trainable": trainable, "params_total": params,
                     "tokens_per_step": tokens})
    reference = next(r for r in rows if is_reference(r))
    for r in rows:
        r["ms_per_step_vs_loraflow"] = r["ms_per_step"] / reference["ms_per_step"]
    return rows

