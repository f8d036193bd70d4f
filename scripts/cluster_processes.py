"""Process supervision for `make cluster`: the state file (the PID and start time of each
component), whether a component still runs, and the stop sweep.

Each component runs in a session of its own (its PID is the session's id), which its
Celery pool processes, log servers and task processes (in process groups of their own,
even once orphaned) stay in: stopping ends every process of those sessions, by PID,
SIGTERM first, SIGKILL after a grace period.
"""

from __future__ import annotations

import json
import os
import signal
import time
from pathlib import Path


def state_path(home: Path) -> Path:
    return home / "cluster.json"


def load_state(home: Path) -> dict:
    path = state_path(home)
    return json.loads(path.read_text()) if path.exists() else {}


def save_state(home: Path, state: dict) -> None:
    tmp = state_path(home).with_suffix(".tmp")
    tmp.write_text(json.dumps(state, indent=2))
    tmp.replace(state_path(home))


def process_of(entry: dict):
    """The recorded process if it still runs (same PID *and* start time: PIDs are reused)."""
    import psutil

    try:
        proc = psutil.Process(entry["pid"])
        if abs(proc.create_time() - entry["started"]) < 1 and proc.status() != psutil.STATUS_ZOMBIE:
            return proc
    except psutil.Error:
        pass
    return None


def processes_in_sessions(sessions: set[int]) -> list:
    """Every process in these sessions. Each component starts one (its PID is the session's
    id) and everything below it stays there: Celery pool processes, log servers, and task
    processes, which run in process groups of their own, even once orphaned."""
    import psutil

    found = []
    for proc in psutil.process_iter():
        try:
            if os.getsid(proc.pid) in sessions:
                found.append(proc)
        except (OSError, psutil.Error):
            continue
    return found


def kill(procs: list, grace_s: float) -> None:
    """SIGTERM the process groups of `procs` (and each process), wait up to grace_s for them
    to exit, then SIGKILL whatever is left."""
    import psutil

    own_group = os.getpgid(0)
    for sig in (signal.SIGTERM, signal.SIGKILL):
        alive = [p for p in procs if p.is_running()]
        groups = set()
        for p in alive:
            try:
                groups.add(os.getpgid(p.pid))
            except ProcessLookupError:
                continue
        for group in groups - {own_group}:
            try:
                os.killpg(group, sig)
            except ProcessLookupError:
                pass
        for p in alive:
            try:
                p.send_signal(sig)
            except psutil.Error:
                pass
        _, procs = psutil.wait_procs(alive, timeout=grace_s if sig == signal.SIGTERM else 10)
        if not procs:
            return
        if sig == signal.SIGTERM:
            names = sorted({_name(p) for p in procs})
            print(f"  still up {grace_s:.0f} s after SIGTERM, SIGKILL: {', '.join(names)}")


def _name(proc) -> str:
    import psutil

    try:
        return " ".join(proc.cmdline())[:60] or proc.name()
    except psutil.Error:  # gone meanwhile
        return str(proc.pid)


def tail(path: Path, lines: int = 30) -> str:
    if not path.exists():
        return ""
    return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])


def wait_for(what: str, check, timeout: float, every: float = 1.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if result := check():
            return result
        time.sleep(every)
    raise TimeoutError(f"timed out after {timeout:.0f} s waiting for {what}")


def sessions_of(state: dict) -> set[int]:
    return {entry["pid"] for entry in state.get("components", {}).values()}


def stop_cluster(home: Path, grace_s: float) -> tuple[int, list]:
    """End every process of the cluster's components; return how many there were and the
    ones still running after SIGKILL (none, normally)."""
    state = load_state(home)
    sessions = sessions_of(state)
    procs = processes_in_sessions(sessions)
    if procs:
        kill(procs, grace_s)
    if state:
        state["components"] = {}
        save_state(home, state)
    return len(procs), processes_in_sessions(sessions)
