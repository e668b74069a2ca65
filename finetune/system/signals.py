"""SIGINT, SIGTERM and SIGHUP handled alike: the command stops cleanly, says `interrupted`, exits 128+signal.

Outside a deferred section a signal raises Interrupted at once (every stage is restartable from the run
directory). Inside one (training steps) it is recorded and acted on at the next step boundary, so the
final checkpoint is consistent; a second signal there raises at once.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

HANDLED = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)


class Interrupted(BaseException):  # noqa: N818 - BaseException: no `except Exception` in a stage may swallow it
    """A signal asked this command to stop."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = int(signum)

    @property
    def exit_code(self) -> int:
        return 128 + self.signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


_state = {"defer": 0, "pending": None}


def _handler(signum: int, _frame) -> None:
    if _state["defer"] and _state["pending"] is None:
        _state["pending"] = signum
        return
    raise Interrupted(signum)


@contextlib.contextmanager
def handled() -> Iterator[None]:
    """Install the handlers for the duration of a command (main thread only; elsewhere a no-op)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.getsignal(sig) for sig in HANDLED}
    for sig in HANDLED:
        signal.signal(sig, _handler)
    _state["pending"] = None
    try:
        yield
    finally:
        for sig, old in previous.items():
            signal.signal(sig, old)


@contextlib.contextmanager
def deferred() -> Iterator[None]:
    """Record signals instead of raising; call check() at safe points."""
    _state["defer"] += 1
    try:
        yield
    finally:
        _state["defer"] -= 1


def pending() -> int | None:
    return _state["pending"]


def check() -> None:
    """Raise the recorded signal, if any (call at a step boundary after saving state)."""
    signum = _state["pending"]
    if signum is not None:
        _state["pending"] = None
        raise Interrupted(signum)


def as_interrupted(exc: BaseException) -> Interrupted | None:
    """A KeyboardInterrupt (handlers not installed, e.g. a library call in a test) counts as SIGINT."""
    if isinstance(exc, Interrupted):
        return exc
    if isinstance(exc, KeyboardInterrupt):
        return Interrupted(signal.SIGINT)
    return None
