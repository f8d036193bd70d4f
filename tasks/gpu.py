"""GPU leases: at most k training tasks per GPU, where k is the `tasks_per_gpu` setting
(tasks.slots; 1 unless set).

The Airflow pool `gpu` (slots = GPUs x k) bounds how many training tasks run at once, but a
pool does not say *which* GPU a task gets, and processes outside Airflow (the `loraflow`
CLI, the benchmark) do not see the pool at all. So every training step takes a lease: one
of k exclusive file locks per device under `<artifacts>/locks/` (`gpu-<i>.lock` is slot 0,
`gpu-<i>.<j>.lock` slot j), any free one. The OS drops a lock when its process dies, so a
killed task never leaves a slot taken.

A run that needs a whole device (`whole_device=True`, or `LORAFLOW_WHOLE_GPU=1`; the
variants whose estimated peak memory exceeds a slot's share take it too, tasks.variants)
first takes the device's gate `gpu-<i>.whole.lock`, which keeps new shared leases off that
device, then waits for every one of its k slots. It holds one pool slot in Airflow like any
other task; the shared tasks that the pool admits meanwhile wait in the lease.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from filelock import FileLock, Timeout

from tasks import slots
from tasks.paths import artifacts_root

log = logging.getLogger(__name__)


def _cuda_device_count() -> int:
    """CUDA devices this process can use (0 without CUDA). torch is imported here, not at
    module level, so the DAG file and CPU-only helpers stay light."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def _device_bytes() -> list[slots.Gpu]:
    """Free and total memory of every visible CUDA device (for `auto`)."""
    import torch

    gpus = []
    for i in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(i)
        gpus.append(slots.Gpu(i, total, free))
    return gpus


def lock_dir() -> Path:
    """Shared by every process that uses the same artifacts root (a shared mount in the
    distributed deployment is fine: flock works on local disks and NFSv4)."""
    return artifacts_root() / "locks"


def slot_lock_name(device_id: str, slot: int) -> str:
    """Slot 0 keeps the one-task-per-GPU name, so k = 1 behaves (and looks) as before."""
    return f"gpu-{device_id}.lock" if slot == 0 else f"gpu-{device_id}.{slot}.lock"


def lease_slots() -> int:
    """k for this process: the setting, where `auto` (not resolved to a number by the entry
    point that started us) is fitted to the devices' *total* memory, so that every process
    on a host computes the same k whatever is running at the moment."""
    setting = slots.setting()
    if setting != slots.AUTO:
        return int(setting)
    gpus = [slots.Gpu(g.index, g.total_bytes, g.total_bytes) for g in _device_bytes()]
    return slots.resolve(setting, gpus)


def _whole_requested() -> bool:
    return os.environ.get("LORAFLOW_WHOLE_GPU", "").strip().lower() in ("1", "true", "yes")


def needs_whole_device(peak_bytes: int, k: int) -> bool:
    """Whether a task with this peak (plus its CUDA context) outgrows a slot: 1/k of the
    smallest visible device's memory."""
    if k <= 1:
        return False
    share = min(g.total_bytes for g in _device_bytes()) / k
    return peak_bytes + slots.CONTEXT_BYTES > share


def variant_peak_bytes(variant: Any, config: Any) -> int:
    """Estimated peak memory of training `variant` (tasks.slots.estimated_peak_bytes) from
    its model's shapes: no weights loaded. Trainable: every parameter for full
    fine-tuning, a 2% upper guess for the methods that train a little of the model."""
    from tasks.models import load_config, skeleton

    shapes = load_config(config.model)
    params = sum(p.numel() for p in skeleton(config.model).parameters())
    trainable = params if variant.method == "full_finetune" else params // 50
    return slots.estimated_peak_bytes(params, trainable, shapes.num_hidden_layers,
                                      shapes.hidden_size, shapes.num_attention_heads,
                                      config.batch_size, config.max_length)


@contextmanager
def gpu_lease(timeout_s: float | None = None, poll_s: float = 2.0,
              whole_device: bool = False,
              peak_bytes: Callable[[], int] | None = None) -> Iterator[str]:
    """Yield a device string for one training task: "cuda:<i>" with one of device i's k
    slots held until the block ends (all of them with `whole_device`), or "cpu" where there
    is no CUDA device or `LORAFLOW_DEVICE=cpu`. `peak_bytes` (called only when k > 1):
    the task's peak memory; above a slot's share, the lease takes the whole device.

    Tries every free slot once without blocking (slot 0 of every device first, so tasks
    spread over the GPUs before they share one), then polls every `poll_s` seconds; raises
    TimeoutError after `timeout_s` (None: wait for ever, bounded in the DAG by the task's
    execution_timeout).
    """
    if os.environ.get("LORAFLOW_DEVICE", "").strip().lower() == "cpu":
        yield "cpu"
        return
    count = _cuda_device_count()
    if count == 0:
        yield "cpu"
        return

    k = lease_slots()
    whole_device = (whole_device or _whole_requested()
                    or (k > 1 and peak_bytes is not None and needs_whole_device(peak_bytes(), k)))
    folder = lock_dir()
    folder.mkdir(parents=True, exist_ok=True)
    # Locks are named by physical device: workers pinned to different GPUs with
    # CUDA_VISIBLE_DEVICES all see theirs as cuda:0, and must not queue behind each other.
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "").strip()
    ids = [d.strip() for d in visible.split(",")] if visible else [str(i) for i in range(count)]
    gates = [FileLock(folder / f"gpu-{ids[i]}.whole.lock") for i in range(count)]
    locks = [[FileLock(folder / slot_lock_name(ids[i], j)) for j in range(k)]
             for i in range(count)]
    take = _take_whole if whole_device else _take_slot
    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    what = "a whole GPU" if whole_device else f"a GPU slot ({k} per GPU)"
    waited = False
    while True:
        with ExitStack() as held:
            index = take(gates, locks, held, deadline, poll_s)
            if index is not None:
                log.info("GPU lease: cuda:%d, %s", index, what)
                try:
                    yield f"cuda:{index}"
                finally:
                    log.info("GPU lease released: cuda:%d", index)
                return
        if deadline is not None and time.monotonic() >= deadline:
            raise TimeoutError(f"no GPU became free within {timeout_s} s waiting for {what}; "
                               f"all {count} devices are leased (locks in {folder})")
        if not waited:
            log.info("every GPU is leased; waiting for %s to free up", what)
            waited = True
        time.sleep(poll_s)


def _try(lock: FileLock, held: ExitStack) -> bool:
    try:
        lock.acquire(blocking=False)
    except Timeout:
        return False
    held.callback(lock.release)
    return True


def _take_slot(gates: list[FileLock], locks: list[list[FileLock]], held: ExitStack,
               deadline: float | None, poll_s: float) -> int | None:
    """One free slot of a device whose gate is open (no whole-device lease holds or awaits
    it); slot-major order spreads tasks over the devices."""
    for j in range(len(locks[0])):
        for i, device_locks in enumerate(locks):
            with ExitStack() as gate:
                if not _try(gates[i], gate):
                    continue  # held whole, or being drained for a whole-device lease
                if _try(device_locks[j], held):
                    return i
    return None


def _take_whole(gates: list[FileLock], locks: list[list[FileLock]], held: ExitStack,
                deadline: float | None, poll_s: float) -> int | None:
    """Every slot of one device. The gate is taken first and kept: no new shared lease
    starts there, so the device drains; each slot is taken as its task ends. Past the
    deadline, what was taken is let go (by `held`) and TimeoutError raised."""
    for i in range(len(gates)):
        if _try(gates[i], held):
            for lock in locks[i]:
                while not _try(lock, held):
                    if deadline is not None and time.monotonic() >= deadline:
                        raise TimeoutError(f"cuda:{i} did not drain for a whole-device lease "
                                           f"before the deadline ({lock.lock_file} stays held)")
                    time.sleep(min(poll_s, 0.5))
            return i
    return None
