"""Where one variant's numbers were measured: the code commit, the torch, CUDA and
transformers versions, the device's name, the worker host and the precision used.

Recorded by each variant itself (into its metrics.json), because in a deployment the
variants run on other hosts, with another torch build, than `prepare` (which writes the
run's environment.json). The commit comes from git where there is a checkout, else from
`$LORAFLOW_COMMIT`, which the Docker image bakes in at build time (docker/Dockerfile).
"""

from __future__ import annotations

import functools
import os
import platform
import subprocess
from pathlib import Path
from typing import Any

from tasks.paths import PROJECT_DIR

UNKNOWN = "unknown"


def git_commit(project_dir: Path = PROJECT_DIR) -> str:
    """HEAD of the checkout (marked when it has uncommitted changes); without git or a
    checkout, `$LORAFLOW_COMMIT` (the image's build argument); else "unknown"."""
    def git(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run(["git", *args], cwd=project_dir, capture_output=True, text=True,
                              timeout=10, check=False)

    try:
        head = git("rev-parse", "HEAD")
        if head.returncode == 0:
            dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
            return head.stdout.strip() + (" (with uncommitted changes)" if dirty else "")
    except (OSError, subprocess.SubprocessError):  # no git binary (the images have none)
        pass
    baked = os.environ.get("LORAFLOW_COMMIT", "").strip()
    return f"{baked} (image build)" if baked else UNKNOWN


def cpu_name() -> str:
    """The CPU model as the kernel names it (e.g. "AMD EPYC 9B14"), else the architecture."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or UNKNOWN


def device_name(device: str) -> str:
    """The GPU model for a CUDA device (e.g. "NVIDIA H200"), else the CPU model."""
    if device.startswith("cuda"):
        import torch

        return torch.cuda.get_device_name(torch.device(device))
    return cpu_name()


@functools.cache
def _stack() -> dict[str, Any]:
    # Read from the installed packages, not by importing them: a baseline's task process
    # would otherwise import torch and transformers (seconds) only to name their versions.
    from importlib.metadata import version

    return {"torch": version("torch"), "cuda": _torch_cuda() or "none (CPU build)",
            "transformers": version("transformers"), "python": platform.python_version()}


def _torch_cuda() -> str | None:
    """The CUDA version torch was built for: `torch.version.cuda`, read from its file
    when torch is not imported yet (it holds constants only)."""
    import sys

    if "torch" in sys.modules:
        return sys.modules["torch"].version.cuda
    import importlib.util
    import runpy

    spec = importlib.util.find_spec("torch")
    return runpy.run_path(str(Path(spec.origin).with_name("version.py"))).get("cuda")


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".h5", ".msgpack")


@functools.cache
def model_weights(source: str) -> str:
    """`sha256:<hex>` over the model's weight files (a local folder, `embedded-minilm`, or
    the hub snapshot in the local cache), so two runs of "the same model" are known to
    have used the same weights. `tiny-distilbert` is built from code (random, seeded):
    the commit identifies it. "unknown" when the files cannot be found."""
    import hashlib

    from tasks.config import RANDOM_MODELS
    from tasks.models import resolve_source

    if source in RANDOM_MODELS:
        return f"random init ({source}, built by the code)"
    try:
        name, local = resolve_source(source)
        if local:
            folder = Path(name)
        else:
            from huggingface_hub import snapshot_download

            folder = Path(snapshot_download(name, local_files_only=True))
        files = sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    except (OSError, ValueError, ImportError) as err:
        return f"{UNKNOWN} ({type(err).__name__})"
    if not files:
        return f"{UNKNOWN} (no weight files in {folder})"
    digest = hashlib.sha256()
    for path in files:
        digest.update(path.name.encode() + b"\0")
        with path.open("rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
    return f"sha256:{digest.hexdigest()}"


def variant_provenance(device: str, precision: str | None,
                       model: str | None = None) -> dict[str, Any]:
    """The record's `provenance`: what a report needs to say where this variant ran, and
    the weights hash of `model` when the variant loads it."""
    return {"git_commit": git_commit(), **_stack(), "device": device,
            "device_name": device_name(device), "host": platform.node(),
            "precision": precision or "fp32",
            "model_weights": model_weights(model) if model else None}
