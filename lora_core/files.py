"""Atomic folder writes, shared by lora_core (adapters) and tasks (every artifact)."""

from __future__ import annotations

import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

_UMASK = os.umask(0)
os.umask(_UMASK)


@contextmanager
def atomic_dir(target: Path | str) -> Iterator[Path]:
    """Yield a fresh temporary folder beside `target`; on success it replaces `target`
    (an existing one is moved aside first, then removed), on failure it is deleted, so a
    killed writer never leaves a folder that looks complete."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent))
    os.chmod(tmp, 0o777 & ~_UMASK)  # mkdtemp makes 0700; readers (web servers) need more
    try:
        yield tmp
        if target.exists():
            old = target.with_name(f".{target.name}.old.{os.getpid()}")
            os.replace(target, old)
            os.replace(tmp, target)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
