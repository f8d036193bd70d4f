"""LoRA (Hu et al. 2021): low-rank factors B·A added to the chosen attention projections,
the pretrained weights frozen, the classification head trained. Implemented in lora_core;
saved as a PEFT-format adapter (`peft.PeftModel.from_pretrained` loads it)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path

from torch import nn

from lora_core.adapter import save_adapter
from lora_core.inject import inject_lora, lora_layers, merge_lora
from tasks.job import Job


def make_trainable(model: nn.Module, job: Job) -> None:
    config = job.config
    modules = inject_lora(model, targets=job.variant.targets, rank=job.variant.rank,
                          alpha=config.lora_alpha, dropout=config.lora_dropout)
    job.record.hyperparameters.update(rank=job.variant.rank, alpha=config.lora_alpha,
                                      dropout=config.lora_dropout, targets=job.variant.targets)
    job.record.details["lora_modules"] = modules


def save(model: nn.Module, job: Job, folder: Path) -> None:
    save_adapter(model, folder, base_model=job.config.model)


def merge(model: nn.Module) -> None:
    merge_lora(model)


@contextlib.contextmanager
def bare(model: nn.Module) -> Iterator[nn.Module]:
    """The bare architecture: every LoRA wrapper swapped for its base nn.Linear (which, when
    merged, holds the adapted weight), restored afterwards."""
    layers = lora_layers(model)
    try:
        for name, layer in layers.items():
            model.set_submodule(name, layer.base)
        yield model
    finally:
        for name, layer in layers.items():
            model.set_submodule(name, layer)
