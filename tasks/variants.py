"""Run one variant, whatever its method: the record's lifecycle around the method's module.

`run_variant` looks the method up in the registry, takes a GPU lease when the method runs
the encoder (unless the caller leased one already), resolves the run's precision setting on
that device (once: the method gets it in its `Job`, tasks/job.py, the contract every method
module imports instead of this dispatcher), calls the method's module, scores the
validation and test predictions it returns, and writes `predictions.parquet` and
`metrics.json`. A method that cannot run on this model raises `NotApplicable`: the
variant is recorded as not applicable, with the reason, and the run goes on. Any other
error, a stop signal included (tasks.stop), is recorded as a failed variant and re-raised.

A variant that is complete (`complete`: its metrics.json says ok or not applicable and the
files an ok record promises are there) is not run again: a second `loraflow run` of a run,
or a cleared Airflow task, keeps it and says so; `force=True` (`loraflow run --force`)
runs it again. A forced rerun that fails never replaces the complete result: that result
is set aside while the rerun runs (`<run>/.kept/<variant>/`) and put back if it fails,
with the failure beside it in `results/<variant>/failed-attempt.json`.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import shutil
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
from tasks.stop import Interrupted, stop_on_signals
from tasks.text import input_budget

log = logging.getLogger(__name__)


def labels(paths: RunPaths, split: str) -> np.ndarray:
    return pd.read_parquet(paths.split_parquet(split), columns=["label"])["label"].to_numpy()


FAILED_ATTEMPT = "failed-attempt.json"  # a forced rerun's failure, beside the result it kept


def run_variant(variant: Variant, config: ExperimentConfig, paths: RunPaths,
                device: str | None = None, attempt: int = 1, force: bool = False) -> Path:
    """Run `variant` on the run's data and write its results; returns its metrics.json.
    A complete variant is not run again unless `force`. `attempt`: Airflow's try number
    (1 outside Airflow), kept in the record."""
    method = registry.method(variant.method)
    # one process per variant: a second one (a task Airflow thought lost, a CLI run beside
    # a DAG run) would overwrite this one's checkpoints and results
    with exclusive(paths.run_dir / ".locks" / f"{variant.name}.lock", f"variant {variant.name}"):
        _recover_kept(variant, method, paths)
        done = complete(variant, method, paths)
        if done is None:
            return _run(variant, method, config, paths, device, attempt)
        out = paths.variant_dir(variant.name)
        if not force:
            log.info("%s is already complete (%s, %s): not run again. To run it again, delete "
                     "%s or run `loraflow run --force`", variant.name, done.status,
                     out / "metrics.json", out)
            return out / "metrics.json"
        log.info("%s is complete (%s); running it again (forced)", variant.name, done.status)
        kept = _set_aside(variant, paths)
        try:
            path = _run(variant, method, config, paths, device, attempt)
        except BaseException:
            _put_back(kept, out)
            log.warning("%s: the forced rerun failed; the earlier result (%s) is kept, the "
                        "failure is in %s", variant.name, done.status, out / FAILED_ATTEMPT)
            raise
        shutil.rmtree(kept)
        return path


def complete(variant: Variant, method: registry.Method, paths: RunPaths) -> MetricsRecord | None:
    """The variant's stored record if the variant is complete: status ok with its
    predictions (and its model, for a method that saves one), or not applicable; else None
    (no record, a failed or unreadable one, or files missing)."""
    out = paths.variant_dir(variant.name)
    try:
        record = MetricsRecord.read(out / "metrics.json")
    except (OSError, ValueError):
        return None
    if record.status == "not_applicable":
        return record
    needed = [out / "predictions.parquet"] + ([out / method.artifact] if method.artifact else [])
    return record if record.ok and all(p.exists() for p in needed) else None


def _kept_dir(variant: Variant, paths: RunPaths) -> Path:
    # outside results/: readers of results/*/metrics.json never see the kept copy
    return paths.run_dir / ".kept" / variant.name


def _set_aside(variant: Variant, paths: RunPaths) -> Path:
    kept = _kept_dir(variant, paths)
    kept.parent.mkdir(parents=True, exist_ok=True)
    paths.variant_dir(variant.name).rename(kept)
    return kept


def _put_back(kept: Path, out: Path) -> None:
    """Restore the result a forced rerun set aside, with the rerun's failure record beside
    it as failed-attempt.json and its epoch checkpoint, if any, for a resume; the rest of
    the rerun's files go."""
    if (out / "metrics.json").is_file():
        (out / "metrics.json").replace(kept / FAILED_ATTEMPT)
    if (out / "checkpoints").is_dir():
        shutil.rmtree(kept / "checkpoints", ignore_errors=True)
        (out / "checkpoints").rename(kept / "checkpoints")
    shutil.rmtree(out, ignore_errors=True)
    kept.rename(out)


def _recover_kept(variant: Variant, method: registry.Method, paths: RunPaths) -> None:
    """A result set aside by a forced rerun whose process died (SIGKILL, power loss): put
    back unless the rerun completed."""
    kept = _kept_dir(variant, paths)
    if not kept.exists():
        return
    if complete(variant, method, paths):
        shutil.rmtree(kept)
        return
    log.warning("%s: a forced rerun did not finish; putting back the earlier result kept in %s",
                variant.name, kept)
    _put_back(kept, paths.variant_dir(variant.name))


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
        # SIGTERM/SIGINT stop the variant at its next step, recorded below (tasks.stop)
        with stop_on_signals(), _device(method.uses_encoder, device, variant, config) as leased:
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
    except BaseException as err:  # also a timeout or a stop signal: the report shows why
        _log_failure(variant, err)
        try:
            record.fail(paths, err)
        except OSError as unrecorded:  # a full disk, say: the first error is the one to see
            log.error("%s: could not record the failure in %s: %s", variant.name,
                      paths.variant_dir(variant.name), unrecorded)
        raise
    finally:
        tracked.finish(record, paths)  # after metrics.json: a copy, never the cause of a failure


def _log_failure(variant: Variant, err: BaseException) -> None:
    """A stop signal or a storage error: a note (the whole run stops, and what stops it
    says why: the CLI's one line, Airflow's task log; the record keeps the traceback);
    anything else with its traceback (the run goes on)."""
    from tasks.failures import storage_error

    if isinstance(err, Interrupted):
        log.info("variant %s recorded as failed: %s", variant.name, err)
    elif (storage := storage_error(err)) is not None:
        log.info("variant %s recorded as failed: %s", variant.name, storage)
    else:
        log.exception("variant %s failed", variant.name)


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
