"""Work run beside the main one, on the core it leaves idle (training uses one BLAS thread): a daemon thread
that a stage later waits for, or stops (beside), or whose errors it takes back (Worker)."""

from __future__ import annotations

import threading
from collections.abc import Callable

Finish = Callable[[bool], str]  # finish(cancel) -> what happened; cancel stops the work first


def beside(work: Callable[[threading.Event], str], name: str, *, after: Finish | None = None) -> Finish:
    """work(stop) in a daemon thread once `after` (work already beside) is done; it returns what happened and
    should return soon after stop is set. finish(cancel) waits for both (stopping them first) and says what
    happened to each."""
    stop, outcome = threading.Event(), [""]

    def run() -> None:
        if after is not None:
            after(False)
        outcome[0] = work(stop)

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()

    def finish(cancel: bool = False) -> str:
        if cancel:
            stop.set()
        before = after(cancel) if after is not None else None
        thread.join()
        return "; ".join(x for x in (before, outcome[0]) if x)

    return finish


class Worker(threading.Thread):
    """fn in a daemon thread (a Ctrl-C is not held up by it; the children it runs cannot outlive this process);
    join() re-raises what fn raised."""

    def __init__(self, fn: Callable[[], object], name: str):
        super().__init__(name=name, daemon=True)
        self.fn, self.error = fn, None
        self.start()

    def run(self) -> None:
        try:
            self.fn()
        except BaseException as exc:  # handed to the caller in join()
            self.error = exc

    def join(self, timeout: float | None = None) -> None:
        super().join(timeout)
        if self.error is not None:
            raise self.error
