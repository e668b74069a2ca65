"""Ollama's Modelfile syntax: each value quoted so Ollama reads it back unchanged, and the parser that checks it."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from finetune.serve.modelfile_syntax import (
    ModelfileError,
    parse_modelfile,
    path_value,
    quote,
    scalar,
    triple_quote,
)


def test_parse_reports_unterminated_quote() -> None:
    with pytest.raises(ModelfileError, match="unterminated"):
        parse_modelfile('FROM x\nTEMPLATE """never closed\n')


def test_parse_skips_comments_and_blank_lines() -> None:
    assert parse_modelfile("# hello\n\nFROM ./m.gguf\n  PARAMETER temperature 0\n") == [
        ("FROM", "./m.gguf"),
        ("PARAMETER", "temperature 0"),
    ]


def test_values_take_the_lightest_quoting_that_holds_them() -> None:
    assert quote("<|im_end|>", "stop") == '"<|im_end|>"'
    assert quote('say "hi"', "stop") == '"""say "hi""""'  # no escapes in Ollama: triple quotes instead
    assert triple_quote("line\nbreak", "SYSTEM") == '"""line\nbreak"""'
    with pytest.raises(ModelfileError, match="SYSTEM must be a string"):
        triple_quote(3, "SYSTEM")


def test_scalars_are_written_as_ollama_parses_them() -> None:
    assert [scalar(True, "k"), scalar(0, "k"), scalar(0.25, "k"), scalar("x y", "k")] == [
        "true",
        "0",
        "0.25",
        '"x y"',
    ]
    for bad, message in ((math.inf, "finite"), ("", "must not be empty"), ([1], "unsupported value")):
        with pytest.raises(ModelfileError, match=message):
            scalar(bad, "k")


def test_paths_are_absolute_or_relative_to_the_modelfile_and_never_a_bare_name(tmp_path: Path) -> None:
    assert path_value(tmp_path / "m.gguf", "FROM") == str(tmp_path.resolve() / "m.gguf")
    assert (
        path_value(tmp_path / "m.gguf", "FROM", relative_to=tmp_path) == "./m.gguf"
    )  # a bare name is a model
    assert path_value(tmp_path / "a b.gguf", "FROM", relative_to=tmp_path) == '"./a b.gguf"'
    with pytest.raises(ModelfileError, match="newline"):
        path_value(tmp_path / "a\nb.gguf", "FROM")


def test_parse_reads_back_every_quoting() -> None:
    text = 'FROM "./a b.gguf"\nTEMPLATE """two\nlines"""\nPARAMETER stop """say "hi""""\n'
    assert parse_modelfile(text) == [
        ("FROM", "./a b.gguf"),
        ("TEMPLATE", "two\nlines"),
        ("PARAMETER", 'stop say "hi"'),
    ]
