"""Stop signals turned into a clean, recorded stop: SIGTERM (Airflow clearing a running
task or marking it failed, `kill`, `docker stop`) and SIGINT (Ctrl-C).

Airflow 3's task runner answers SIGTERM by calling the operator's `on_kill` and nothing
else, so a training variant trained on and could write `ok` in a task Airflow already
showed failed; Python's own SIGTERM default kills the process without a word. While
`stop_on_signals()` is active (around one variant, tasks.variants), a stop signal sets a
flag that the training loop checks at every step (`check_stop`), which raises
`Interrupted`: the variant is recorded as failed with "stopped by SIGTERM", and its last
epoch checkpoint stays for a resume. The handler also calls the one it replaced (Airflow's
`on_kill`), unless that one would raise at once: the flag stops the work instead, between
two steps. A second signal stops at once.

The CLI owns its process and stops at once (`stop_at_once`) wherever the signal finds it,
outside a variant; inside one, the variant's handler takes over.

Standard library only: the CLI imports it before torch.
"""

from __future__ import annotations

import contextlib
import logging
import signal
import threading
from collections.abc import Iterator
from typing import Any

log = logging.getLogger(__name__)

STOP_SIGNALS = (signal.SIGTERM, signal.SIGINT)
_received: list[int] = []  # the stop signals received while stop_on_signals is active
_active = threading.Event()  # stop_on_signals is installed (it does not nest)


class Interrupted(BaseException):
    """A stop signal ended the work. A BaseException, as KeyboardInterrupt: code that goes
    on after an ordinary failure (`except Exception`: the next variant of a run) stops."""

    def __init__(self, signum: int) -> None:
        self.signum = signum
        self.signal_name = signal.Signals(signum).name
        super().__init__(f"stopped by {self.signal_name} (the process was told to stop: "
                         "Airflow sends it when a running task is cleared or marked failed, "
                         "Ctrl-C sends SIGINT)")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 143 for SIGTERM, 130 for SIGINT


def check_stop() -> None:
    """Raise Interrupted if a stop signal arrived: called between steps of long work."""
    if _received:
        raise Interrupted(_received[0])


def raise_interrupted(signum: int, frame: Any) -> None:
    """A handler that stops at once, wherever the process is (the CLI's)."""
    raise Interrupted(signum)


# handlers that raise at once: stop_on_signals does not chain to them (its flag stops the
# work at the next step instead, where nothing is half-done)
_RAISE_AT_ONCE = (signal.default_int_handler, raise_interrupted)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """For the block, SIGTERM and SIGINT set the stop flag (logged) instead of their usual
    effect, and the previous handlers come back afterwards. A signal that arrives after the
    block's last `check_stop` still stops it, as it ends. Outside the main thread (where
    Python cannot set handlers), or nested, it does nothing."""
    if threading.current_thread() is not threading.main_thread() or _active.is_set():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}

    def on_signal(signum: int, frame: Any) -> None:
        if _received:  # asked twice: stop now
            raise Interrupted(signum)
        _received.append(signum)
        log.info("%s received: stopping at the next step (send it again to stop at once)",
                 signal.Signals(signum).name)
        prior = previous[signum]
        if callable(prior) and prior not in _RAISE_AT_ONCE:
            prior(signum, frame)  # Airflow's own handler (on_kill) still runs

    _received.clear()
    _active.set()
    try:
        for sig, prior in previous.items():
            if prior is not signal.SIG_IGN:  # a signal the process ignores stays ignored
                signal.signal(sig, on_signal)
        yield
        check_stop()
    finally:
        for sig, prior in previous.items():
            signal.signal(sig, prior if prior is not None else signal.SIG_DFL)
        _received.clear()
        _active.clear()


@contextlib.contextmanager
def stop_at_once() -> Iterator[None]:
    """For the block, SIGTERM and SIGINT raise Interrupted wherever the process is (the CLI:
    one line and exit code 128 + the signal's number instead of a traceback or a silent
    death); the previous handlers come back afterwards."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {s: signal.getsignal(s) for s in STOP_SIGNALS}
    try:
        for sig, prior in previous.items():
            if prior is not signal.SIG_IGN:
                signal.signal(sig, raise_interrupted)
        yield
    finally:
        for sig, prior in previous.items():
            signal.signal(sig, prior if prior is not None else signal.SIG_DFL)
