"""A PostgreSQL and a Redis of the cluster tests' own, so that the faults can stop and start
them (the machine's shared servers are never touched): PostgreSQL from the installed
server's `initdb`/`pg_ctl` (run as user `postgres`, a data folder and port of its own),
Redis from `redis-server` on a port of its own, keeping nothing on disk."""

from __future__ import annotations

import os
import pwd
import shutil
import socket
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def _wait(port: int, up: bool, timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while _listening(port) != up:
        if time.monotonic() > deadline:
            raise TimeoutError(f"port {port} still {'closed' if up else 'open'} after {timeout} s")
        time.sleep(0.2)


def missing() -> str | None:
    """Why these servers cannot run here, or None."""
    for tool in ("initdb", "pg_ctl", "redis-server"):
        if shutil.which(tool) is None and not (_pg_bindir() / tool).exists():
            return f"{tool} is not installed"
    try:
        pwd.getpwnam("postgres")
    except KeyError:
        return "there is no user `postgres` to run PostgreSQL as"
    if os.geteuid() != 0:
        return "starting PostgreSQL as user `postgres` needs root"
    return None


def _pg_bindir() -> Path:
    try:
        out = subprocess.run(["pg_config", "--bindir"], capture_output=True, text=True, check=True)
        return Path(out.stdout.strip())
    except (OSError, subprocess.CalledProcessError):
        return Path("/usr/lib/postgresql/bin")


def _pg(tool: str) -> str:
    return shutil.which(tool) or str(_pg_bindir() / tool)


@dataclass
class Postgres:
    """A PostgreSQL server in a folder of its own (trust authentication, 127.0.0.1)."""

    folder: Path = field(default_factory=lambda: Path(tempfile.mkdtemp(prefix="loraflow-pg-")))
    port: int = field(default_factory=free_port)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}"

    def _as_postgres(self, *args: str) -> None:
        subprocess.run(["runuser", "-u", "postgres", "--", *args], check=True,
                       capture_output=True, timeout=120)

    def create(self) -> Postgres:
        shutil.chown(self.folder, "postgres")
        self._as_postgres(_pg("initdb"), "-D", str(self.folder / "data"), "-A", "trust",
                          "-U", "postgres", "--no-sync")
        self.start()
        return self

    def start(self) -> None:
        self._as_postgres(_pg("pg_ctl"), "-D", str(self.folder / "data"), "-l",
                          str(self.folder / "server.log"), "-w", "-o",
                          f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
                          "-c max_connections=200 -c fsync=off", "start")
        _wait(self.port, up=True)

    def stop(self, mode: str = "fast") -> None:
        """`fast`: sessions cut off, as a restarted database server does to its clients."""
        self._as_postgres(_pg("pg_ctl"), "-D", str(self.folder / "data"), "-m", mode, "-w", "stop")
        _wait(self.port, up=False)

    def remove(self) -> None:
        if _listening(self.port):
            self.stop("immediate")
        shutil.rmtree(self.folder, ignore_errors=True)


@dataclass
class Redis:
    """A redis-server on a port of its own that keeps nothing on disk: a restart loses
    every queued message and stored result, as a broker that crashed would."""

    port: int = field(default_factory=free_port)
    proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> Redis:
        self.proc = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
             "--appendonly", "no"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        _wait(self.port, up=True)
        return self

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(timeout=10)
        _wait(self.port, up=False)
