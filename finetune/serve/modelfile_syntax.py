"""Ollama's Modelfile syntax: values quoted so Ollama reads them back unchanged, and a parser to check that.

Ollama's parser (parser/parser.go) takes a value to the end of the line unless it starts with `"` or
`\"\"\"`, in which case it runs to the matching closing quote (newlines included) with no escape sequences.
So a value can hold anything except the triple quote.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any

from finetune.errors import UserError


class ModelfileError(UserError):
    """A value cannot be written into a Modelfile, or a chat format is unknown."""


def parse_modelfile(text: str) -> list[tuple[str, str]]:
    """(command, value) pairs of a Modelfile, unquoted as Ollama does; PARAMETER values keep their name
    as "name value". Only for checking what we rendered, not a full reimplementation of Ollama's parser."""
    out: list[tuple[str, str]] = []
    i, n = 0, len(text)
    while i < n:
        while i < n and text[i] in " \t\r\n":
            i += 1
        if i >= n:
            break
        if text[i] == "#":
            i = _line_end(text, i) + 1
            continue
        j = i
        while j < n and text[j] not in " \t\r\n":
            j += 1
        command = text[i:j].upper()
        i = j
        while i < n and text[i] in " \t":
            i += 1
        prefix = ""
        if command == "PARAMETER":
            j = i
            while j < n and text[j] not in " \t\r\n":
                j += 1
            prefix = text[i:j] + " "
            i = j
            while i < n and text[i] in " \t":
                i += 1
        value, i = _read_value(text, i)
        out.append((command, prefix + value))
    return out


def _read_value(text: str, i: int) -> tuple[str, int]:
    # As Ollama does: a value ends at the first line break where the text so far is fully quoted.
    j = i
    while True:
        end = _line_end(text, j)
        ok, value = _unquote(text[i:end].strip())
        if ok:
            return value, end
        if end >= len(text):
            raise ModelfileError(f"unterminated quoted value starting at offset {i}: {text[i : i + 40]!r}")
        j = end + 1


def _unquote(s: str) -> tuple[bool, str]:
    for quote in ('"""', '"'):
        if s.startswith(quote):
            closed = len(s) >= 2 * len(quote) and s.endswith(quote)
            return closed, s[len(quote) : -len(quote)] if closed else ""
    return True, s


def _line_end(text: str, i: int) -> int:
    ends = [e for e in (text.find("\n", i), text.find("\r", i)) if e >= 0]
    return min(ends) if ends else len(text)


def path_value(path: str | Path, what: str, relative_to: str | Path | None = None) -> str:
    value = str(Path(path).expanduser().resolve())
    if relative_to is not None:
        value = os.path.relpath(value, Path(relative_to).expanduser().resolve())
        value = value if value.startswith(("../", "/")) else f"./{value}"  # a bare name would mean a model
    if "\n" in value or "\r" in value:
        raise ModelfileError(f"{what} path must not contain a newline: {value!r}")
    return quote(value, what) if any(c in value for c in ' \t"') else value


def triple_quote(value: str, what: str) -> str:
    if not isinstance(value, str):
        raise ModelfileError(f"{what} must be a string, got {type(value).__name__}")
    if '"""' in value:
        raise ModelfileError(f'{what} must not contain \'"""\': a Modelfile cannot quote it')
    return f'"""{value}"""'


def quote(value: str, what: str) -> str:
    # A single `"` inside is fine within triple quotes; Ollama has no escape sequences at all.
    return triple_quote(value, what) if '"' in value else f'"{value}"'


def scalar(value: Any, key: str) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, int):
        return str(value)
    if isinstance(value, float):
        if not math.isfinite(value):
            raise ModelfileError(f"parameter {key} must be finite, got {value}")
        return json.dumps(value)
    if isinstance(value, str):
        if not value:
            raise ModelfileError(f"parameter {key} must not be empty")
        return quote(value, key)
    raise ModelfileError(f"parameter {key}: unsupported value {value!r} ({type(value).__name__})")
