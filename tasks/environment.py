"""What code and stack prepared a run: git commit (tasks.provenance), package versions,
platform. Recorded in `<run_dir>/environment.json` when the run is prepared, so a report
rebuilt later still names the code that measured its numbers; each variant records where
it ran itself (`provenance` in its metrics.json)."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
from typing import Any

from tasks.provenance import git_commit

PACKAGES = ("torch", "transformers", "peft", "apache-airflow", "great_expectations", "pandas",
            "scikit-learn", "matplotlib")


def version(package: str) -> str:
    try:
        return importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


@functools.cache
def environment() -> dict[str, Any]:
    return {"git_commit": git_commit(), "packages": {p: version(p) for p in PACKAGES},
            "python": platform.python_version(), "platform": platform.platform()}


def progress_disabled() -> bool | None:
    """tqdm off when LORAFLOW_PROGRESS=0; None lets tqdm switch itself off without a tty."""
    return True if os.environ.get("LORAFLOW_PROGRESS", "1") == "0" else None
