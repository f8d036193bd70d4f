"""Where a run's artifacts live, and atomic writes so a killed task never leaves a file
that looks complete (shared/docs/design.md, "Artifacts of a run")."""

from __future__ import annotations

import json
import os
import re
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from lora_core.files import _UMASK, atomic_dir  # noqa: F401  (atomic_dir re-exported)

PROJECT_DIR = Path(__file__).resolve().parents[1]
_RUN_ID_OK = re.compile(r"^[A-Za-z0-9._+:-]+$")
_SLUG_KEEPS = re.compile(r"[A-Za-z0-9_-]|(?<!^)\.")  # a leading '.' would hide the folder


def artifacts_root() -> Path:
    return Path(os.environ.get("LORAFLOW_ARTIFACTS", PROJECT_DIR / "artifacts")).resolve()


def reports_root() -> Path:
    return Path(os.environ.get("LORAFLOW_REPORTS", PROJECT_DIR / "reports")).resolve()


def safe_run_id(run_id: str) -> str:
    """Airflow run ids contain ':' and '+' (manual__2026-11-29T05:00:00+00:00); keep them
    readable but refuse path separators so a run id can never escape the runs folder."""
    if not run_id or not _RUN_ID_OK.match(run_id) or run_id in {".", ".."}:
        raise ValueError(f"run id {run_id!r} may hold only letters, digits and . _ + : -")
    return run_id


def report_slug(run_id: str) -> str:
    """The run's folder under the reports root, and its name in report URLs: the run id with
    every other character written ~XX (hex), as in percent-encoding, so
    `manual__2026-11-29T13:23:57.899928+00:00` gives
    `manual__2026-11-29T13~3A23~3A57.899928~2B00~3A00`. Reversible, so two run ids never
    share a folder; only URL-unreserved characters (RFC 3986), so it needs no quoting."""
    return "".join(c if _SLUG_KEEPS.match(run_id, i) else f"~{ord(c):02X}"
                   for i, c in enumerate(safe_run_id(run_id)))


def report_url(run_id: str, base_url: str | None = None) -> str:
    """The run's report as the Airflow API server serves it (plugins/loraflow_reports.py):
    `[api] base_url` (AIRFLOW__API__BASE_URL) + /loraflow/reports/<slug>/report.html; only
    the path when no base URL is configured."""
    if base_url is None:
        conf = getattr(sys.modules.get("airflow.configuration"), "conf", None)
        # In an Airflow process its config (airflow.cfg or the environment); elsewhere
        # importing Airflow just for this would create $AIRFLOW_HOME, so the environment.
        base_url = (conf.get("api", "base_url", fallback="") if conf is not None
                    else os.environ.get("AIRFLOW__API__BASE_URL", "")) or ""
    return f"{base_url.rstrip('/')}/loraflow/reports/{report_slug(run_id)}/report.html"


@dataclass(frozen=True)
class RunPaths:
    """Every path a run reads or writes. Built from a run id; nothing is created here."""

    run_id: str
    artifacts: Path
    reports: Path

    @classmethod
    def for_run(cls, run_id: str, artifacts: Path | str | None = None,
                reports: Path | str | None = None) -> RunPaths:
        return cls(safe_run_id(run_id), Path(artifacts or artifacts_root()).resolve(),
                   Path(reports or reports_root()).resolve())

    @classmethod
    def from_run_dir(cls, run_dir: Path | str, reports: Path | str | None = None) -> RunPaths:
        run_dir = Path(run_dir).resolve()
        if run_dir.parent.name != "runs":
            raise ValueError(f"{run_dir} is not a run folder (expected <artifacts>/runs/<run_id>)")
        return cls.for_run(run_dir.name, run_dir.parent.parent, reports)

    @property
    def run_dir(self) -> Path:
        return self.artifacts / "runs" / self.run_id

    @property
    def config_json(self) -> Path:  # the run's effective ExperimentConfig
        return self.run_dir / "config.json"

    @property
    def data_dir(self) -> Path:
        return self.run_dir / "data"

    @property
    def train_parquet(self) -> Path:
        return self.data_dir / "train.parquet"

    @property
    def test_parquet(self) -> Path:
        return self.data_dir / "test.parquet"

    @property
    def validation_json(self) -> Path:
        return self.data_dir / "validation.json"

    @property
    def tokens_json(self) -> Path:  # pointer to the tokenization cache + length statistics
        return self.data_dir / "tokens.json"

    @property
    def results_dir(self) -> Path:
        return self.run_dir / "results"

    def variant_dir(self, variant: str) -> Path:
        return self.results_dir / variant

    @property
    def cache_dir(self) -> Path:
        return self.artifacts / "cache"

    @property
    def report_dir(self) -> Path:
        return self.reports / report_slug(self.run_id)


# --- atomic writes ------------------------------------------------------------------------

@contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it over `target` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    os.chmod(tmp_path, 0o666 & ~_UMASK)  # mkstemp makes 0600; readers (web servers) need more
    try:
        yield tmp_path
        os.replace(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


def write_text(target: Path | str, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target: Path | str, data: Any) -> Path:
    return write_text(target, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path | str) -> Any:
    return json.loads(Path(path).read_text(encoding="utf-8"))
