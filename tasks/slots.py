"""How many training tasks share one GPU: the `tasks_per_gpu` setting, k.

`LORAFLOW_TASKS_PER_GPU` = a whole number >= 1, or `auto` (default 1: one task per GPU).
Every entry point reads it the same way (`python -m tasks.slots`): pool `gpu` gets GPUs x k
slots, each Celery `gpu` worker concurrency k, and the lease (tasks.gpu) k slots per
device. Without a GPU, k is 1 whatever the setting: the pool keeps its one slot per
worker and nothing else changes.

`auto` fits k to the free memory of the smallest GPU and one task's peak: the largest
CUDA peak recorded by earlier runs under the artifacts root (measured), else an estimate
for the heaviest preset, full fine-tuning of DistilBERT-base at 16 x 512 (`paper`), plus
each process's CUDA context; capped at AUTO_MAX and at the CPU cores per GPU (each task
needs a core to feed its GPU). A variant that needs more than a slot's share of its
device takes the whole device (tasks.gpu, `whole_device`).

Standard library only: shell scripts and the DAG's host call it before torch exists there.
"""

from __future__ import annotations

import json
import math
import os
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

ENV = "LORAFLOW_TASKS_PER_GPU"
AUTO = "auto"
AUTO_MAX = 8  # beyond this, a launch-bound step gains nothing from more processes
HEADROOM = 0.9  # of free memory: fragmentation, the allocator's cache
CONTEXT_BYTES = 1 << 30  # per process: CUDA context, cuBLAS/cuDNN workspaces (not in max_allocated)


@dataclass(frozen=True)
class Gpu:
    index: int
    total_bytes: int
    free_bytes: int


def parse(value: str | None) -> int | str:
    """`auto` or a whole number >= 1; empty or unset means 1."""
    text = (value or "").strip().lower()
    if not text:
        return 1
    if text == AUTO:
        return AUTO
    if text.isdigit() and int(text) >= 1:
        return int(text)
    raise ValueError(f"{ENV} must be a whole number >= 1 or 'auto', got {value!r}")


def setting() -> int | str:
    return parse(os.environ.get(ENV))


def nvidia_smi_gpus() -> list[Gpu]:
    """The GPUs nvidia-smi lists, with their memory (none without nvidia-smi)."""
    if not shutil.which("nvidia-smi"):
        return []
    out = subprocess.run(["nvidia-smi", "--query-gpu=index,memory.total,memory.free",
                          "--format=csv,noheader,nounits"], capture_output=True, text=True,
                         check=False).stdout
    gpus = []
    for line in out.splitlines():
        fields = [f.strip() for f in line.split(",")]
        if len(fields) == 3 and all(f.isdigit() for f in fields):
            index, total, free = map(int, fields)
            gpus.append(Gpu(index, total << 20, free << 20))  # MiB
    return gpus


def activation_bytes(layers: int, hidden: int, heads: int, batch: int, seq: int,
                     bytes_per_value: int = 4) -> int:
    """Activations a transformer encoder keeps for backward: per layer s*b*h*(34 + 5*a*s/h)
    bytes at 16 bits (Korthikanti et al. 2022, "Reducing activation recomputation", sec. 4.1),
    scaled to `bytes_per_value`."""
    per_layer = seq * batch * hidden * (34 + 5 * heads * seq / hidden) * bytes_per_value / 2
    return int(layers * per_layer)


def estimated_peak_bytes(params: int, trainable: int, layers: int, hidden: int, heads: int,
                         batch: int, seq: int) -> int:
    """fp32 weights (4 bytes a parameter), gradients and AdamW's two moments for the
    trainable ones (12 more), and fp32 activations: an upper estimate, autocast keeps less."""
    return 4 * params + 12 * trainable + activation_bytes(layers, hidden, heads, batch, seq)


# DistilBERT-base (transformers' DistilBertConfig defaults): the `paper` preset's model.
PAPER_FULL_FINETUNE = dict(params=66_955_010, trainable=66_955_010, layers=6, hidden=768,
                           heads=12, batch=16, seq=512)


def measured_peak_bytes(artifacts: Path | None = None) -> int | None:
    """The largest CUDA peak (`cuda_max_allocated`) any recorded variant reached, or None."""
    if artifacts is None:
        from tasks.paths import artifacts_root

        artifacts = artifacts_root()
    peaks = []
    for path in Path(artifacts).glob("runs/*/results/*/metrics.json"):
        try:
            record = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if record.get("peak_memory_kind") == "cuda_max_allocated" and record.get("peak_memory_bytes"):
            peaks.append(int(record["peak_memory_bytes"]))
    return max(peaks) if peaks else None


def task_bytes(artifacts: Path | None = None) -> int:
    """Device memory one task needs: its peak (measured, else estimated) plus its context."""
    peak = measured_peak_bytes(artifacts) or estimated_peak_bytes(**PAPER_FULL_FINETUNE)
    return peak + CONTEXT_BYTES


def resolve(value: int | str, gpus: list[Gpu], per_task_bytes: int | None = None,
            cpus: int | None = None) -> int:
    """k for these GPUs: 1 without a GPU; a number as given; `auto` as the module says."""
    if not gpus:
        return 1
    if value != AUTO:
        return int(value)
    per_task = per_task_bytes or task_bytes()
    fits = math.floor(min(g.free_bytes for g in gpus) * HEADROOM / per_task)
    cores = (cpus or os.cpu_count() or 1) // len(gpus)
    return max(1, min(fits, AUTO_MAX, max(cores, 1)))


def plan(gpus: list[Gpu] | None = None, value: int | str | None = None) -> dict[str, int]:
    """What an entry point configures: GPUs found, k, and pool `gpu`'s slots (GPUs x k; one
    on a machine without a GPU, where training runs on the CPU)."""
    gpus = nvidia_smi_gpus() if gpus is None else gpus
    k = resolve(setting() if value is None else value, gpus)
    return {"gpus": len(gpus), "tasks_per_gpu": k, "pool_slots": max(1, len(gpus) * k)}


def main(argv: list[str] | None = None) -> int:
    """`python -m tasks.slots`: the plan as shell assignments (GPUS=.. TASKS_PER_GPU=..
    POOL_SLOTS=..) for `eval`; a bad setting exits 2 with the reason."""
    del argv
    try:
        p = plan()
    except ValueError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"GPUS={p['gpus']} TASKS_PER_GPU={p['tasks_per_gpu']} POOL_SLOTS={p['pool_slots']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
