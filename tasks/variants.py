"""Run one variant, whatever its method: the record's lifecycle around the method's module.

`run_variant` looks the method up in the registry, takes a GPU lease when the method runs
the encoder (unless the caller leased one already), calls the method's module, scores the
validation and test predictions it returns, and writes `predictions.parquet` and
`metrics.json`. A method that cannot run on this model raises `NotApplicable`: the
variant is recorded as not applicable, with the reason, and the run goes on. Any other
error is recorded as a failed variant and re-raised.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd

from tasks import registry
from tasks.config import ExperimentConfig
from tasks.metrics import MetricsRecord
from tasks.paths import RunPaths, exclusive, read_json
from tasks.registry import Variant
from tasks.text import input_budget

log = logging.getLogger(__name__)


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
    """What a method's module gets: the variant, the run, its record and its device."""

    variant: Variant
    config: ExperimentConfig
    paths: RunPaths
    record: MetricsRecord
    device: str

    @property
    def out(self) -> Path:
        return self.paths.variant_dir(self.variant.name)


def labels(paths: RunPaths, split: str) -> np.ndarray:
    return pd.read_parquet(paths.split_parquet(split), columns=["label"])["label"].to_numpy()


def run_variant(variant: Variant, config: ExperimentConfig, paths: RunPaths,
                device: str | None = None) -> Path:
    """Run `variant` on the run's data and write its results; returns its metrics.json."""
    method = registry.method(variant.method)
    # one process per variant: a second one (a task Airflow thought lost, a CLI run beside
    # a DAG run) would overwrite this one's checkpoints and results
    with exclusive(paths.run_dir / ".locks" / f"{variant.name}.lock", f"variant {variant.name}"):
        return _run(variant, method, config, paths, device)


def _run(variant: Variant, method: registry.Method, config: ExperimentConfig,
         paths: RunPaths, device: str | None) -> Path:
    from tasks import tracking

    record = MetricsRecord.start(variant, config.model, config.preset)
    record.input_budget = input_budget(
        method.reads, read_json(paths.tokens_json) if paths.tokens_json.exists() else None)
    tracked = tracking.variant_run(variant, paths)  # inactive unless MLflow tracking is on
    try:
        module = importlib.import_module(method.module)
        with _device(method.uses_encoder, device) as leased:
            record.device = leased
            job = Job(variant, config, paths, record, leased)
            if method.trained:
                from tasks.train import train_variant

                predictions = train_variant(job, module, on_log=tracked.log_progress)
            else:
                predictions = module.predict(job)
        path = record.finish(paths, (labels(paths, "validation"), predictions.validation),
                             (labels(paths, "test"), predictions.test))
        log.info("%s: validation accuracy %.4f, test accuracy %.4f", variant.name,
                 record.validation_accuracy, record.accuracy)
        return path
    except NotApplicable as err:
        log.warning("%s is not applicable: %s", variant.name, err.reason)
        return record.not_applicable(paths, err.reason)
    except BaseException as err:  # also a timeout or kill signal: the report shows why
        log.exception("variant %s failed", variant.name)
        record.fail(paths, err)
        raise
    finally:
        tracked.finish(record, paths)  # after metrics.json: a copy, never the cause of a failure


@contextlib.contextmanager
def _device(uses_encoder: bool, given: str | None):
    """The device a variant runs on: the caller's, else a GPU lease (one task per GPU)
    for methods that run the encoder, else the CPU."""
    if given or not uses_encoder:
        yield given or "cpu"
        return
    from tasks.gpu import gpu_lease

    with gpu_lease() as leased:
        if leased.startswith("cuda"):  # nothing in this process may touch another GPU
            import torch

            torch.cuda.set_device(torch.device(leased))
        yield leased
