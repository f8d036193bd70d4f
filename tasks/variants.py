"""Run one variant, whatever its method: the record's lifecycle around the method's module.

`run_variant` looks the method up in the registry, takes a GPU lease when the method runs
the encoder (unless the caller leased one already), resolves the run's precision setting on
that device (once: the method gets it in its `Job`, tasks/job.py, the contract every method
module imports instead of this dispatcher), calls the method's module, scores the
validation and test predictions it returns, and writes `predictions.parquet` and
`metrics.json`. A method that cannot run on this model raises `NotApplicable`: the
variant is recorded as not applicable, with the reason, and the run goes on. Any other
error is recorded as a failed variant and re-raised.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
from pathlib import Path

import numpy as np
import pandas as pd

from tasks import registry
from tasks.config import ExperimentConfig
from tasks.job import Job, NotApplicable
from tasks.metrics import MetricsRecord
from tasks.paths import RunPaths, exclusive, read_json
from tasks.provenance import variant_provenance
from tasks.registry import Variant
from tasks.text import input_budget

log = logging.getLogger(__name__)


def labels(paths: RunPaths, split: str) -> np.ndarray:
    return pd.read_parquet(paths.split_parquet(split), columns=["label"])["label"].to_numpy()


def run_variant(variant: Variant, config: ExperimentConfig, paths: RunPaths,
                device: str | None = None, attempt: int = 1) -> Path:
    """Run `variant` on the run's data and write its results; returns its metrics.json.
    `attempt`: Airflow's try number (1 outside Airflow), kept in the record."""
    method = registry.method(variant.method)
    # one process per variant: a second one (a task Airflow thought lost, a CLI run beside
    # a DAG run) would overwrite this one's checkpoints and results
    with exclusive(paths.run_dir / ".locks" / f"{variant.name}.lock", f"variant {variant.name}"):
        return _run(variant, method, config, paths, device, attempt)


def _run(variant: Variant, method: registry.Method, config: ExperimentConfig,
         paths: RunPaths, device: str | None, attempt: int) -> Path:
    from tasks import tracking

    record = MetricsRecord.start(variant, config.model, config.preset)
    record.attempt = attempt
    record.input_budget = input_budget(
        method.reads, read_json(paths.tokens_json) if paths.tokens_json.exists() else None)
    tracked = tracking.variant_run(variant, paths)  # inactive unless MLflow tracking is on
    try:
        module = importlib.import_module(method.module)
        with _device(method.uses_encoder, device, variant, config) as leased:
            record.device = leased
            record.provenance = variant_provenance(
                leased, None, config.model if method.uses_encoder else None)
            job = Job(variant, config, paths, record, leased, _precision(method, config, leased))
            if method.uses_encoder:
                record.precision = job.precision
            if method.trained:
                from tasks.train import train_variant

                predictions = train_variant(job, module, on_log=tracked.log_progress)
            else:
                predictions = module.predict(job)
        record.provenance["precision"] = (record.precision or job.precision
                                          if method.uses_encoder else "n/a (no encoder)")
        log.info("%s: scoring validation and test predictions", variant.name)
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


def _precision(method: registry.Method, config: ExperimentConfig, device: str) -> str:
    """The run's precision setting resolved on `device`, once for the whole variant: for a
    trained method at its training batch's shape (batch_size x max_length tokens), for a
    baseline at none given. Methods that do not run the encoder compute in numpy (fp32 or
    wider) and need no torch."""
    if not method.uses_encoder:
        return "fp32"
    from tasks.evaluate import resolve_precision

    tokens = config.batch_size * config.max_length if method.trained else None
    return resolve_precision(config.precision, device, tokens)


@contextlib.contextmanager
def _device(uses_encoder: bool, given: str | None, variant: Variant, config: ExperimentConfig):
    """The device a variant runs on: the caller's, else a GPU lease (a slot of a GPU, or
    all of one for a variant too large to share it) for methods that run the encoder, else
    the CPU."""
    if given or not uses_encoder:
        yield given or "cpu"
        return
    from tasks.gpu import gpu_lease, variant_peak_bytes

    with gpu_lease(peak_bytes=lambda: variant_peak_bytes(variant, config)) as leased:
        if leased.startswith("cuda"):  # nothing in this process may touch another GPU
            import torch

            torch.cuda.set_device(torch.device(leased))
        yield leased
