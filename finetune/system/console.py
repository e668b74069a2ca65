"""Plain console output for logs: when stdout is not a terminal, colour and cursor escapes are dropped.

mlx-lm's training UI forces truecolor (rich) whatever the stream; CI logs and `> file` want plain text.
"""

from __future__ import annotations

import contextlib
import io
import re
import sys
from collections.abc import Iterator
from typing import IO

ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]|\x1b\][^\x07]*\x07")


class PlainWriter(io.TextIOBase):
    """A text stream that forwards to `inner` without ANSI escape sequences."""

    def __init__(self, inner: IO[str]):
        self.inner = inner

    def write(self, s: str) -> int:
        self.inner.write(ANSI.sub("", s))
        return len(s)

    def flush(self) -> None:
        self.inner.flush()

    def isatty(self) -> bool:
        return False

    def fileno(self) -> int:
        return self.inner.fileno()


@contextlib.contextmanager
def plain_unless_terminal(stream_name: str = "stdout") -> Iterator[None]:
    stream = getattr(sys, stream_name)
    if stream.isatty():
        yield
        return
    setattr(sys, stream_name, PlainWriter(stream))
    try:
        yield
    finally:
        setattr(sys, stream_name, stream)
