"""Why a run stopped before its variants could run: the step that failed (`prepare`, a data
step) records its error beside where the report would be, `<reports>/<run>/failure.json`,
since `prepare` can fail before the run folder exists. `check_variants` and the Report tab
(plugins/loraflow_reports.py) read it to say what happened instead of waiting for a report.
`storage_error` tells a full, read-only or forbidden disk (which stops a whole run) from a
failure of one variant, and says it in one sentence.
Standard library only: the API server's plugin imports it.
"""

from __future__ import annotations

import contextlib
import errno
import json
import re
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from tasks.paths import report_slug, reports_root, write_json

FILE = "failure.json"


def failure_path(run_id: str, reports: Path | str | None = None) -> Path:
    return Path(reports or reports_root()) / report_slug(run_id) / FILE


@contextlib.contextmanager
def recorded(run_id: str, step: str, attempt: int = 1) -> Iterator[None]:
    """Run a step; if it raises, record which step and why (then re-raise). A later
    successful try of the same step removes its record."""
    try:
        yield
    except BaseException as err:
        write_json(failure_path(run_id), {
            "step": step, "error": str(err) or type(err).__name__, "type": type(err).__name__,
            "attempt": attempt, "at": datetime.now(UTC).isoformat(timespec="seconds")})
        raise
    stale = read(run_id)
    if stale and stale.get("step") == step:
        failure_path(run_id).unlink(missing_ok=True)


def read(run_id: str, reports: Path | str | None = None) -> dict[str, Any] | None:
    """The run's failure record, or None (also for an unreadable one)."""
    try:
        data = json.loads(failure_path(run_id, reports).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) and "step" in data else None


def sentence(failure: dict[str, Any]) -> str:
    """`The run stopped in prepare (try 1): <error>`, without a closing period (the caller
    adds one; the error's own would double it)."""
    error = str(failure.get("error") or "no error recorded").rstrip().rstrip(".")
    return f"The run stopped in {failure['step']} (try {failure.get('attempt', 1)}): {error}"


def what_failed(run_id: str, run_dir: str | None) -> str:
    """What `check_variants` says when something upstream failed: the step that stopped
    the run and its error, else the variants that failed, by name."""
    failure = read(run_id)
    if failure:
        no_report = (" There is no report: the run folder was never made."
                     if failure["step"] == "prepare" else
                     " The report lists the variants as not run.")
        stopped = sentence(failure)
        # after an error of several lines (prepare's list of problems) on a line of its own,
        # not glued to the last problem
        after = "\n" if "\n" in stopped else " "
        return f"{stopped}.{after}No variant ran.{no_report}"
    if run_dir is None:
        return ("prepare failed (its log says why): no variant ran and there is no report.")
    failed = []
    for metrics in sorted(Path(run_dir, "results").glob("*/metrics.json")):
        try:
            status = json.loads(metrics.read_text(encoding="utf-8")).get("status")
        except (OSError, ValueError):
            status = "unreadable"
        if status not in ("ok", "not_applicable"):
            failed.append(f"{metrics.parent.name} ({status})")
    if failed:
        return (f"{len(failed)} variant(s) did not finish: {', '.join(failed)}. Their errors "
                "are in the report and in results/<variant>/metrics.json.")
    return ("a task before the variants failed without recording why (see the failed task's "
            "log in the grid); no variant recorded a result.")


# errors of the storage itself, not of a step: every later write fails the same way
_STORAGE = {
    errno.ENOSPC: ("no space left on device writing {}", "free space and run again"),
    errno.EDQUOT: ("disk quota exceeded writing {}", "free space and run again"),
    errno.EROFS: ("read-only file system: cannot write {}",
                  "choose a writable artifacts or reports folder ($LORAFLOW_ARTIFACTS, "
                  "$LORAFLOW_REPORTS, --artifacts, --reports) and run again"),
    errno.EACCES: ("permission denied on {}",
                   "give this user access or choose another folder, and run again"),
}
_ERRNO_IN_TEXT = re.compile(r"errno (\d+)|os error (\d+)", re.IGNORECASE)  # pyarrow, safetensors


def storage_error(err: BaseException) -> str | None:
    """One sentence for a storage error (disk full, quota, read-only, permission denied) in
    `err` or in the errors it was raised from or while handling, naming the path and what
    to do; None for any other error."""
    seen: set[int] = set()
    while err is not None and id(err) not in seen:
        seen.add(id(err))
        code = getattr(err, "errno", None)
        if code is None and (found := _ERRNO_IN_TEXT.search(str(err))):
            code = int(found.group(1) or found.group(2))
        if code in _STORAGE:
            what, todo = _STORAGE[code]
            name = getattr(err, "filename", None)
            return f"{what.format(name if name else 'a file (the error names none)')}: {todo}"
        err = err.__cause__ or err.__context__
    return None
