"""Progress of long stages: a heartbeat line while a stage runs, with an ETA from the run history.

Training shows per-step progress itself (mlx-lm's UI); conversion, fuse, export and each runtime's
evaluation are single long calls, so a thread prints "[gguf] 30 s (usually ~45 s: ~15 s left)" every
`every` seconds. Plain lines, no cursor tricks: the same text is right in a terminal and in a CI log.
"""

from __future__ import annotations

import contextlib
import statistics
import threading
import time
from collections.abc import Callable, Iterator, Sequence


def expected_seconds(history_rows: Sequence[dict], command: str, model: str) -> dict[str, float]:
    """Median seconds of each stage over this command and model's earlier runs (stages that really ran)."""
    times: dict[str, list[float]] = {}
    for row in history_rows[-50:]:
        if row.get("command") != command or row.get("model") != model:
            continue
        for name, s in (row.get("stages") or {}).items():
            if s.get("status") == "passed" and not s.get("cached") and s.get("seconds"):
                times.setdefault(name, []).append(float(s["seconds"]))
    return {name: statistics.median(v) for name, v in times.items()}


def describe(elapsed: float, expected: float | None) -> str:
    if expected is None:
        return f"{elapsed:.0f} s"
    left = expected - elapsed
    eta = f"~{left:.0f} s left" if left > 0 else f"{-left:.0f} s over"
    return f"{elapsed:.0f} s (usually ~{expected:.0f} s: {eta})"


@contextlib.contextmanager
def heartbeat(
    name: str, log: Callable[[str], None], expected: float | None, every: float = 15.0
) -> Iterator[None]:
    """Log "[name] <elapsed> ..." every `every` seconds until the block ends."""
    stop = threading.Event()
    start = time.monotonic()

    def beat() -> None:
        while not stop.wait(every):
            log(f"[{name}] {describe(time.monotonic() - start, expected)}")

    thread = threading.Thread(target=beat, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join(timeout=1)
