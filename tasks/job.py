"""The method contract: what a method's module is given (`Job`), what it returns
(`Predictions`), how it declines (`NotApplicable`), and what a trained method's module
provides (`TrainedMethod`, `MergeableMethod`).

Method modules (tasks/methods/), the training loop (tasks.train), the evaluation
(tasks.evaluate) and the dispatcher (tasks.variants) import this module; it imports none
of them. Light on purpose: no torch at import time.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, NamedTuple, Protocol

import numpy as np

from tasks.config import ExperimentConfig
from tasks.metrics import MetricsRecord
from tasks.paths import RunPaths
from tasks.registry import Variant

if TYPE_CHECKING:
    import torch
    from torch import nn

# what a precision setting resolves to on a device (tasks.evaluate.resolve_precision)
RESOLVED_PRECISIONS = ("fp32", "bf16", "fp16")


class NotApplicable(Exception):
    """The method cannot run on this model (e.g. zero-shot on random weights)."""

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class Predictions(NamedTuple):
    validation: np.ndarray  # P(positive) per row of data/validation.parquet, in order
    test: np.ndarray  # ... and of data/test.parquet


@dataclass
class Job:
    """What a method's module gets: the variant, the run, its record, its device and the
    precision the run's setting resolved to on that device (`fp32`, `bf16` or `fp16`;
    resolved once, by tasks.variants, so every method computes and records the same)."""

    variant: Variant
    config: ExperimentConfig
    paths: RunPaths
    record: MetricsRecord
    device: str
    precision: str = "fp32"

    def __post_init__(self) -> None:
        if self.precision not in RESOLVED_PRECISIONS:
            raise ValueError(
                f"Job.precision must be one of {', '.join(RESOLVED_PRECISIONS)} "
                f"(a resolved precision), got {self.precision!r}"
            )

    @property
    def out(self) -> Path:
        return self.paths.variant_dir(self.variant.name)

    @property
    def dtype(self) -> torch.dtype | None:
        """The autocast dtype of `precision`; None means fp32 (no autocast)."""
        import torch

        return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[self.precision]


class TrainedMethod(Protocol):
    """A gradient-trained method's module: what differs between such methods; the loop,
    the record and the evaluation are tasks.train's."""

    def make_trainable(self, model: nn.Module, job: Job) -> None:
        """Set requires_grad; add the method's details to job.record."""

    def save(self, model: nn.Module, job: Job, folder: Path) -> None:
        """Write the trained model into `folder`."""


class MergeableMethod(TrainedMethod, Protocol):
    """A trained method the registry marks `mergeable`."""

    def merge(self, model: nn.Module) -> None:
        """Fold the adaptation into the base weights."""

    def bare(self, model: nn.Module) -> AbstractContextManager[nn.Module]:
        """The model without its adaptation, for timing."""


class Baseline(Protocol):
    """A baseline's module (not trained by tasks.train)."""

    def predict(self, job: Job) -> Predictions:
        """Fit on the training subset (choices on train or validation only), fill
        job.record, return P(positive) for every validation and test row; raise
        NotApplicable(reason) when the method cannot run on the run's model."""
