"""llama.cpp's converter is fetched once, hash-checked, from the same release as the xllamacpp runtime."""

from __future__ import annotations

from finetune.export import converter


def test_the_fetched_tree_holds_the_converter_and_its_own_gguf_package():
    tree = converter.fetch_converter()  # `make setup` fetched it; a second call is a no-op
    assert (tree / "convert_hf_to_gguf.py").is_file() and (tree / "conversion" / "__init__.py").is_file()
    assert (tree / "gguf-py" / "gguf" / "__init__.py").is_file() and (tree / "LICENSE").is_file()
    assert converter.fetch_converter() == tree


def test_the_converter_release_is_the_runtimes():
    assert converter.runtime_version() == converter.VERSION


def test_only_the_converters_files_are_extracted():
    wanted = converter._wanted
    base = converter.PREFIX
    assert wanted(base + "convert_hf_to_gguf.py") == "convert_hf_to_gguf.py"
    assert wanted(base + "conversion/llama.py") == "conversion/llama.py"
    assert wanted(base + "src/llama.cpp") is None and wanted(base + "models/ggml-vocab-gpt2.gguf") is None
    assert wanted(base + "../../etc/passwd") is None and wanted("other/convert_hf_to_gguf.py") is None
