"""Airflow's [core] hostname_callable for `make cluster`: `loraflow_hostname.worker_hostname`.

Every task process imports it, so it stays tiny and standard-library only: several Celery
workers share one host, and each task instance records the worker that ran it
(`gpu-0.<host>`), which the REST API then shows.
"""

from __future__ import annotations

import os
import socket


def worker_hostname() -> str:
    """`<worker>.<host>` in a Celery worker (and the task processes it starts; the launcher
    sets LORAFLOW_WORKER_NAME), the host's name elsewhere."""
    host = socket.gethostname()
    worker = os.environ.get("LORAFLOW_WORKER_NAME")
    return f"{worker}.{host}" if worker else host
