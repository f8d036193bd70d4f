"""Full fine-tuning: every weight of the encoder and the head trained; saved with
`save_pretrained` (safetensors), loadable with `AutoModelForSequenceClassification`."""

from __future__ import annotations

from pathlib import Path

from torch import nn

from tasks.job import Job


def make_trainable(model: nn.Module, job: Job) -> None:
    model.requires_grad_(True)


def save(model: nn.Module, job: Job, folder: Path) -> None:
    model.save_pretrained(folder)
