"""What code and stack produced a run: git commit, package versions, platform. Recorded
in `<run_dir>/environment.json` when the run is prepared, so a report rebuilt later still
names the code that measured its numbers."""

from __future__ import annotations

import functools
import importlib.metadata
import os
import platform
import subprocess
from typing import Any

from tasks.paths import PROJECT_DIR

PACKAGES = ("torch", "transformers", "peft", "apache-airflow", "great_expectations", "pandas",
            "scikit-learn", "matplotlib")


def git_commit() -> str:
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=PROJECT_DIR, capture_output=True, text=True,
                              timeout=10, check=False)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode != 0:
            return "unknown"
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return "unknown"


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
