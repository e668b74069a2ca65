"""Non-terminal output is plain text: colour escapes from rich (mlx-lm's training UI) are dropped."""

from __future__ import annotations

import io
import sys

from finetune.system.console import ANSI, PlainWriter, plain_unless_terminal


def test_escapes_are_stripped_and_text_kept():
    buf = io.StringIO()
    PlainWriter(buf).write("\x1b[1;32m3.833 ▼\x1b[0m  \x1b[38;5;244m1\x1b[0m\n")
    assert buf.getvalue() == "3.833 ▼  1\n" and not ANSI.search(buf.getvalue())


def test_a_non_terminal_stdout_is_wrapped_only_inside_the_block(monkeypatch):
    buf = io.StringIO()
    monkeypatch.setattr(sys, "stdout", buf)
    with plain_unless_terminal():
        print("\x1b[1mbold\x1b[0m")
        assert isinstance(sys.stdout, PlainWriter)
    assert sys.stdout is buf and buf.getvalue() == "bold\n"
