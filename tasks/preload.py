"""The ML stack imported once per worker, before it forks task processes.

Airflow runs every task in a process forked from a worker: a Celery pool process (itself
forked from the Celery worker's main process), or a LocalExecutor worker (forked from the
scheduler). Each loraflow task then imports torch, transformers, Great Expectations or the
report stack: seconds per task, on every task of every run. Here the worker imports them
once, when it starts, so every task process it forks begins with them in memory, shared
copy-on-write:

- Celery: docker/airflow.env points `[celery] celery_config_options` at `CELERY_CONFIG`
  (Airflow's own settings), for `make cluster` and the Compose deployment alike. Reading
  it imports this module, which connects a handler to Celery's `celeryd_init` signal,
  sent only in `celery worker` (never in the scheduler that reads the same settings).
- LocalExecutor (`make ui`, the tests' Airflow): `tasks.preload.LocalExecutor` imports the
  stack in the scheduler before it forks its workers (scripts/airflow_env.sh sets it).

Importing torch starts no thread and touches no GPU, so forking after it is safe; CUDA is
first initialised in the task process (tasks.variants). An import that fails (a worker image
without some extra) is reported and skipped: the task imports what it needs as before.
"""

from __future__ import annotations

import importlib
import sys
import time

from airflow.executors import local_executor

# What loraflow's tasks import (their heavy parts): data steps, methods, training, report.
# transformers' Auto model classes are a lazy attribute until used: their module by name.
PRELOAD = ("pandas", "pyarrow.parquet", "sklearn.metrics", "torch", "transformers",
           "transformers.models.auto.modeling_auto", "tasks.models", "tasks.tokenize",
           "tasks.validate", "tasks.variants", "tasks.train", "tasks.evaluate", "tasks.report")


def preload(modules: tuple[str, ...] = PRELOAD) -> dict[str, str]:
    """Import `modules`; what failed, with why."""
    failed = {}
    for name in modules:
        try:
            importlib.import_module(name)
        except Exception as err:  # a missing extra must not stop the worker
            failed[name] = f"{type(err).__name__}: {err}"
    return failed


def preload_and_say(who: str) -> None:
    start = time.monotonic()
    failed = preload()
    # Celery has not set its logging up yet: straight to the component's output
    print(f"loraflow: {who} imported the ML stack for the tasks in "
          f"{time.monotonic() - start:.1f} s" + (f"; not imported: {failed}" if failed else ""),
          file=sys.stderr, flush=True)


def _in_the_celery_worker(**_) -> None:
    preload_and_say("the Celery worker")


try:  # the `celery` extra: a Celery deployment
    from celery.signals import celeryd_init
except ImportError:  # without it, the LocalExecutor alone
    pass
else:
    celeryd_init.connect(_in_the_celery_worker)


def __getattr__(name: str):
    # CELERY_CONFIG, read only where Celery is configured: importing Airflow's Celery
    # settings logs warnings about Celery options that a LocalExecutor does not have
    if name == "CELERY_CONFIG":
        from airflow.providers.celery.executors.default_celery import DEFAULT_CELERY_CONFIG

        return DEFAULT_CELERY_CONFIG  # Airflow's settings, unchanged
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


class LocalExecutor(local_executor.LocalExecutor):
    """Airflow's LocalExecutor, whose workers are forked with the ML stack imported. Same
    class name: Airflow recognises a local executor by it (e.g. the simple auth manager's
    production warning)."""

    def start(self) -> None:
        if self.is_mp_using_fork:  # spawned workers would start bare anyway
            preload_and_say("the LocalExecutor")
        super().start()
