"""GPU leases: one training task per GPU, ever.

The Airflow pool `gpu` (slots = number of GPUs) bounds how many training tasks run at
once, but a pool does not say *which* GPU a task gets, and processes outside Airflow (the
`loraflow` CLI, the benchmark) do not see the pool at all. So every training step takes a
lease: an exclusive file lock per device index under `<artifacts>/locks/gpu-<i>.lock`.
The OS drops the lock when its process dies, so a killed task never leaves a GPU taken.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from filelock import FileLock, Timeout

from tasks.paths import artifacts_root

log = logging.getLogger(__name__)


def _cuda_device_count() -> int:
    """CUDA devices this process can use (0 without CUDA). torch is imported here, not at
    module level, so the DAG file and CPU-only helpers stay light."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def lock_dir() -> Path:
    """Shared by every process that uses the same artifacts root (a shared mount in the
    distributed deployment is fine: flock works on local disks and NFSv4)."""
    return artifacts_root() / "locks"


@contextmanager
def gpu_lease(timeout_s: float | None = None, poll_s: float = 2.0) -> Iterator[str]:
    """Yield a device string for one training task: "cuda:<i>" held exclusively until the
    block ends, or "cpu" where there is no CUDA device or `LORAFLOW_DEVICE=cpu`.

    Tries every device once without blocking, then polls every `poll_s` seconds until one
    frees up; raises TimeoutError after `timeout_s` (None: wait for ever, bounded in the
    DAG by the task's execution_timeout).
    """
    if os.environ.get("LORAFLOW_DEVICE", "").strip().lower() == "cpu":
        yield "cpu"
        return
    count = _cuda_device_count()
    if count == 0:
        yield "cpu"
        return

    folder = lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    # Locks are named by physical device: workers pinned to different GPUs with
    # CUDA_VISIBLE_DEVICES all see theirs as cuda:0, and must not queue behind each other.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    ids = [d.strip() for d in visible.split(",")] if visible else [str(i) for i in range(count)]
    locks = [FileLock(folder / f"gpu-{ids[i]}.lock") for i in range(count)]
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    waited = False
    while True:
        for index, lock in enumerate(locks):
            try:
                lock.acquire(blocking=False)
            except Timeout:
                continue
            log.info("GPU lease: cuda:%d (%s)", index, lock.lock_file)
            try:
                yield f"cuda:{index}"
            finally:
                lock.release()
                log.info("GPU lease released: cuda:%d", index)
            return
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"no GPU became free within {timeout_s} s; all {count} "
                               f"devices are leased (locks in {folder})")
        if not waited:
            log.info("all %d GPUs are leased; waiting for one to free up", count)
            waited = True
        time.sleep(poll_s)
