"""Where a run's artifacts live, and atomic writes so a killed task never leaves a file
that looks complete."""

from __future__ import annotations

import errno
import fcntl
import glob
import hashlib
import json
import os
import platform
import re
import shutil
import sys
import tempfile
import uuid
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

PROJECT_DIR = Path(__file__).resolve().parents[1]
SPLITS = ("train", "validation", "test")  # the run's three disjoint subsets
_RUN_ID_OK = re.compile(r"[A-Za-z0-9._+:-]+")  # fullmatch: `$` would let "x\n" pass
_SLUG_KEEPS = re.compile(r"[A-Za-z0-9_-]|(?<!^)\.")  # a leading '.' would hide the folder


def artifacts_root() -> Path:
    return Path(os.environ.get("LORAFLOW_ARTIFACTS", PROJECT_DIR / "artifacts")).resolve()


def reports_root() -> Path:
    return Path(os.environ.get("LORAFLOW_REPORTS", PROJECT_DIR / "reports")).resolve()


def cache_root(artifacts: Path | str) -> Path:
    """The normalised sources, their validation and the tokenizations: `$LORAFLOW_CACHE`
    when set (one cache for many artifacts roots, e.g. a test session's), else
    `<artifacts>/cache`. Cache keys and file locks make sharing it safe."""
    cache = os.environ.get("LORAFLOW_CACHE")
    return Path(cache).resolve() if cache else Path(artifacts) / "cache"


def safe_run_id(run_id: str) -> str:
    """Airflow run ids contain ':' and '+' (manual__2026-11-29T05:00:00+00:00); keep them
    readable but refuse path separators so a run id can never escape the runs folder."""
    if not run_id or not _RUN_ID_OK.fullmatch(run_id) or run_id in {".", ".."}:
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

    def split_parquet(self, split: str) -> Path:
        if split not in SPLITS:
            raise ValueError(f"unknown split {split!r}; expected one of {SPLITS}")
        return self.data_dir / f"{split}.parquet"

    @property
    def train_parquet(self) -> Path:
        return self.split_parquet("train")

    @property
    def validation_parquet(self) -> Path:
        return self.split_parquet("validation")

    @property
    def test_parquet(self) -> Path:
        return self.split_parquet("test")

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
        return cache_root(self.artifacts)

    @property
    def report_dir(self) -> Path:
        return self.reports / report_slug(self.run_id)


# --- ownership -----------------------------------------------------------------------------

class InUse(RuntimeError):
    """Another process owns this run or variant right now."""


@contextmanager
def exclusive(lock_file: Path, what: str) -> Iterator[None]:
    """Own `what` for the block, or raise InUse at once if another process does. An OS
    lock (flock), so it dies with its holder: a retry after a crash proceeds."""
    lock_file.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(lock_file, os.O_RDWR | os.O_CREAT, 0o666 & ~UMASK)
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = Path(lock_file).read_text().strip() or "another process"
            raise InUse(f"{what} is in use by {holder} (lock {lock_file}); wait for it to "
                        "finish or use another run id") from None
        os.ftruncate(fd, 0)
        os.write(fd, f"process {os.getpid()} on {platform.node()}".encode())
        yield
    finally:
        os.close(fd)


# --- atomic writes ------------------------------------------------------------------------
# A file or folder appears complete or not at all: written under a temporary name beside
# the target, flushed to disk, then renamed over it, and the parent folder flushed so the
# rename itself survives a power loss. Permissions follow the umask (mkstemp, mkdtemp and
# safetensors create owner-only files; a shared artifacts volume needs group access).

def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


UMASK = _umask()
_RENAME_ATTEMPTS = 50  # concurrent writers of one target take turns at most this often


def fsync_path(path: Path) -> None:
    """Flush a file's or a folder's contents to disk."""
    fd = os.open(path, os.O_RDONLY | (os.O_DIRECTORY if path.is_dir() else 0))
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _seal(tmp: Path) -> None:
    """Shared-readable permissions and everything flushed, before the rename."""
    paths = [tmp] + (sorted(tmp.rglob("*"), reverse=True) if tmp.is_dir() else [])
    for p in paths:
        if p.is_symlink():
            continue
        os.chmod(p, (0o777 if p.is_dir() else 0o666) & ~UMASK)
        fsync_path(p)


def _install(tmp: Path, target: Path) -> None:
    """Rename `tmp` over `target`; a folder already there is moved aside and removed. Two
    writers of one target may interleave: each retries until its own rename lands."""
    for _ in range(_RENAME_ATTEMPTS):
        try:
            os.replace(tmp, target)  # a file, an empty folder or nothing at target: done
            break
        except OSError as err:
            if err.errno not in (errno.ENOTEMPTY, errno.EEXIST):
                raise
            if not target.is_dir():  # another writer moved it aside meanwhile: try again
                continue
        aside = target.with_name(f".{target.name}.old.{os.getpid()}.{uuid.uuid4().hex[:8]}")
        try:
            os.replace(target, aside)
        except FileNotFoundError:  # another writer moved it first: try again
            continue
        shutil.rmtree(aside, ignore_errors=True)
    else:
        raise OSError(f"could not install {target}: {_RENAME_ATTEMPTS} concurrent writers "
                      "kept replacing it")
    fsync_path(target.parent)


_FULL = (errno.ENOSPC, errno.EDQUOT)
_OS_ERROR_IN_TEXT = re.compile(r"errno (\d+)|os error (\d+)", re.IGNORECASE)  # safetensors


@contextmanager
def _naming_the_target(target: Path) -> Iterator[None]:
    """A full disk met by a writer that names no file (safetensors: "os error 28", a bare
    write()) is raised as an OSError naming `target`, so the error says where."""
    try:
        yield
    except Exception as err:
        code = getattr(err, "errno", None)
        if code is None and (found := _OS_ERROR_IN_TEXT.search(str(err))):
            code = int(found.group(1) or found.group(2))
        if code in _FULL and not getattr(err, "filename", None):
            raise OSError(code, os.strerror(code), str(target)) from err
        raise


@contextmanager
def atomic_path(target: Path | str) -> Iterator[Path]:
    """Yield a temporary path beside `target`; rename it over `target` only on success."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
    os.close(fd)
    tmp_path = Path(tmp)
    try:
        with _naming_the_target(target):
            yield tmp_path
            _seal(tmp_path)
            _install(tmp_path, target)
    finally:
        tmp_path.unlink(missing_ok=True)


@contextmanager
def atomic_dir(target: Path | str) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `target`; on success it replaces `target`
    whole, on failure it is deleted, so a killed writer never leaves a folder that looks
    complete. Temporary names start with '.', so globs of real entries skip them."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    try:
        with _naming_the_target(target):
            yield tmp
            _seal(tmp)
            _install(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def remove_leftovers(target: Path | str) -> list[Path]:
    """Remove what killed writers of `target` left beside it: atomic_dir's and atomic_path's
    temporaries (`.<name>.*.tmp`) and a replaced folder not yet deleted (`.<name>.old.*`).
    Call it only while no other writer of `target` can be alive, i.e. holding its lock (a
    flock dies with its holder). Returns what was removed."""
    target = Path(target)
    name = glob.escape(target.name)
    removed = sorted({*target.parent.glob(f".{name}.*.tmp"), *target.parent.glob(f".{name}.old.*")})
    for leftover in removed:
        if leftover.is_dir() and not leftover.is_symlink():
            shutil.rmtree(leftover, ignore_errors=True)
        else:
            leftover.unlink(missing_ok=True)
    return removed


def write_text(target: Path | str, text: str) -> Path:
    with atomic_path(target) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(target)


def write_json(target: Path | str, data: Any) -> Path:
    return write_text(target, json.dumps(data, indent=2, sort_keys=True, default=str) + "\n")


def read_json(path: Path | str) -> Any:
    """The JSON in `path`; a damaged file raises ValueError naming it."""
    path = Path(path)
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{path} is not valid JSON ({err})") from err


# --- checksums ----------------------------------------------------------------------------
# A cache records the SHA-256 of each file it writes and checks them on every hit: a file
# damaged on disk (flipped bytes, a truncated copy, an edit) is a miss, never wrong data.

def sha256_file(path: Path | str) -> str:
    with open(path, "rb") as f:
        return hashlib.file_digest(f, "sha256").hexdigest()


def checksums(folder: Path | str, names: Iterable[str]) -> dict[str, str]:
    """{file name: its SHA-256} for the named files in `folder`."""
    return {name: sha256_file(Path(folder) / name) for name in names}


def damaged_files(folder: Path | str, expected: dict[str, str]) -> list[str]:
    """The names in `expected` ({file name: SHA-256}) whose file in `folder` is missing or
    has another SHA-256."""
    damaged = []
    for name, digest in expected.items():
        try:
            if sha256_file(Path(folder) / name) != digest:
                damaged.append(name)
        except FileNotFoundError:
            damaged.append(name)
    return damaged
