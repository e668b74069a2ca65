"""Tool versions for stage keys: packages by distribution version, the converter by its files, Ollama by -v."""

from __future__ import annotations

import importlib.metadata

from finetune.export import converter
from finetune.stages import versions
from finetune.stages.keys import CONVERTER


def test_a_package_is_its_installed_version_and_an_absent_one_is_none():
    assert versions.tool_version("pytest") == importlib.metadata.version("pytest")
    assert versions.tool_version("no-such-package-here") is None


def test_the_converter_is_its_pinned_bundle_and_the_digest_of_its_fetched_files(tmp_path, monkeypatch):
    monkeypatch.setenv("FT_CACHE_DIR", str(tmp_path))
    assert versions.tool_version(CONVERTER) == (
        f"{converter.VERSION} (sdist {converter.SDIST_SHA256[:16]}, files not fetched)"
    )
    tree = converter.default_dest() / f"{converter.PACKAGE}-{converter.VERSION}-llama.cpp"
    (tree / "conversion").mkdir(parents=True)
    (tree / "convert_hf_to_gguf.py").write_text("print('convert')\n")
    first = versions.tool_version(CONVERTER)
    assert converter.VERSION in first and "not fetched" not in first
    (tree / converter.MARKER).write_text('{"total_s": 3.1}')  # a fetch's timings: not the tool
    (tree / "conversion" / "__pycache__").mkdir()
    (tree / "conversion" / "__pycache__" / "x.pyc").write_bytes(b"compiled")  # written by running it
    assert versions.tool_version(CONVERTER) == first
    (tree / "convert_hf_to_gguf.py").write_text("print('edited')\n")
    assert versions.tool_version(CONVERTER) != first


def test_ollama_is_the_version_its_binary_reports_not_its_path(tmp_path):
    binary = tmp_path / "bin" / "ollama"
    binary.parent.mkdir()
    binary.write_text("#!/bin/sh\necho 'Warning: could not connect to a running Ollama instance'\n"
                      "echo 'Warning: client version is 0.6.1'\n")  # fmt: skip
    binary.chmod(0o755)
    assert versions.ollama_version(binary) == "0.6.1"
    moved = tmp_path / "elsewhere"
    binary.rename(moved)
    assert versions.ollama_version(moved) == "0.6.1"
    moved.write_text("#!/bin/sh\necho 'Warning: client version is 0.7.0'\n")
    assert versions.ollama_version(moved) == "0.7.0"  # replaced in place: asked again
    assert versions.ollama_version(tmp_path / "none") == "unreadable (FileNotFoundError)"
