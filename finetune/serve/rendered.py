"""The prompt text Ollama built from its TEMPLATE, read back from its debug log.

Ollama has no tokenize endpoint (0.5.4); with OLLAMA_DEBUG=1 it logs every prompt it renders, quoted by Go's
log/slog (`msg="chat request" images=0 prompt="..."`). That text, tokenized by the GGUF's tokenizer, is what the
model was given, so it can be compared token by token with what training rendered.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")

DEBUG_ENV = {"OLLAMA_DEBUG": "1"}
_LINE = re.compile(r'msg="(?:chat|generate) request" images=\d+ prompt=("(?:[^"\\]|\\.)*"|\S*)')
_SIMPLE = {"a": 7, "b": 8, "f": 12, "n": 10, "r": 13, "t": 9, "v": 11, "\\": 92, '"': 34, "'": 39}


def go_unquote(quoted: str) -> str:
    """The string a Go strconv.Quote literal (slog's quoting) stands for; an unquoted token is itself."""
    if not quoted.startswith('"'):
        return quoted
    body, out, i = quoted[1:-1], bytearray(), 0
    while i < len(body):
        c = body[i]
        if c != "\\":
            out += c.encode()
            i += 1
            continue
        k = body[i + 1]
        if k in _SIMPLE:
            out.append(_SIMPLE[k])
            i += 2
        elif k == "x":  # a byte (invalid UTF-8, or a control character)
            out.append(int(body[i + 2 : i + 4], 16))
            i += 4
        elif k in "uU":
            width = 4 if k == "u" else 8
            out += chr(int(body[i + 2 : i + 2 + width], 16)).encode()
            i += 2 + width
        else:
            raise ValueError(f"unknown escape \\{k} in {quoted[:80]!r}")
    return out.decode("utf-8", errors="replace")


def rendered_prompts(log_text: str) -> list[str]:
    """Every prompt the server logged rendering, in order."""
    return [go_unquote(m.group(1)) for m in _LINE.finditer(log_text)]


def log_size(log_path: Path) -> int:
    return log_path.stat().st_size if log_path.is_file() else 0


def asked_and_rendered(log_path: Path | None, ask: Callable[[], T]) -> tuple[T, str | None]:
    """ask()'s result and the last prompt the server logged rendering meanwhile (None without a log)."""
    mark = log_size(log_path) if log_path is not None else 0
    result = ask()
    rendered = rendered_since(log_path, mark) if log_path is not None else []
    return result, rendered[-1] if rendered else None


def rendered_since(log_path: Path, offset: int) -> list[str]:
    """The prompts rendered since the log had `offset` bytes."""
    with open(log_path, "rb") as f:
        f.seek(offset)
        return rendered_prompts(f.read().decode("utf-8", errors="replace"))
