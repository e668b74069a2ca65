"""Reading a GGUF without llama.cpp; check_gguf flags what llama.cpp would refuse or read unlike the HF folder;
rewrite_string edits one metadata string in place."""

from __future__ import annotations

import json
import shutil

import pytest

from finetune.export.gguf_inspect import (
    GGUFReadError,
    check_gguf,
    expected_tokenizer_model,
    inspect_gguf,
    rewrite_number,
    rewrite_string,
)


def test_inspect_gguf_rejects_a_non_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(GGUFReadError, match="not a GGUF file"):
        inspect_gguf(bad)


def test_the_converters_file_holds_the_tokenizer_llamacpp_expects(tiny_f16_gguf, tiny_hf):
    from transformers import AutoTokenizer

    info = inspect_gguf(tiny_f16_gguf)
    hf = AutoTokenizer.from_pretrained(str(tiny_hf))
    assert info.architecture == "llama"
    assert (info.tokenizer_model, info.tokenizer_pre, info.token_type_kind) == ("gpt2", "smollm", "INT32")
    assert (
        len(info.tokens) == 49152 and info.tokens[1] == "<|im_start|>" and info.token_types[1] == 3
    )  # CONTROL
    assert info.special_ids["bos"] == hf.bos_token_id and info.special_ids["eos"] == hf.eos_token_id
    assert info.chat_template == hf.chat_template and "<|im_start|>" in info.chat_template
    names = {t.name: t for t in info.tensors}
    assert "output.weight" not in names  # tied embeddings
    assert names["blk.0.attn_norm.weight"].type == "F32" and names["blk.0.attn_k.weight"].type == "F16"
    assert check_gguf(tiny_f16_gguf, tiny_hf) == []
    assert expected_tokenizer_model(tiny_hf) == "gpt2"


def test_check_gguf_flags_an_export_done_mlx_lms_way(tiny_hf, tmp_path):
    import mlx.core as mx
    from mlx_lm.gguf import convert_to_gguf

    config = json.loads((tiny_hf / "config.json").read_text())
    out = tmp_path / "mlx-lm.gguf"
    convert_to_gguf(tiny_hf, mx.load(str(tiny_hf / "model.safetensors")), config, str(out))
    problems = "\n".join(check_gguf(out, tiny_hf))
    assert "tokenizer.ggml.model is 'llama', the HF tokenizer is 'gpt2'" in problems
    assert "array of UINT32" in problems
    assert "chat_template differs" in problems


def test_check_gguf_flags_a_config_the_file_does_not_match(tiny_hf, tiny_f16_gguf, tmp_path):
    other = tmp_path / "hf"
    shutil.copytree(tiny_hf, other, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(cfg | {"num_hidden_layers": 3, "vocab_size": 50000}))
    problems = "\n".join(check_gguf(tiny_f16_gguf, other))
    assert "llama.block_count is 2, HF config says 3" in problems
    assert "49152 tokens, the HF config's vocab_size is 50000" in problems


def test_check_gguf_compares_the_computing_metadata_with_the_hf_config_value_by_value(
    tiny_hf, tiny_f16_gguf, tmp_path
):
    cfg = json.loads((tiny_hf / "config.json").read_text())
    meta = inspect_gguf(tiny_f16_gguf).metadata
    assert meta["llama.context_length"] == cfg["max_position_embeddings"]
    assert meta["llama.rope.freq_base"] == cfg["rope_theta"]
    other = tmp_path / "hf"
    shutil.copytree(tiny_hf, other, ignore=shutil.ignore_patterns("*.safetensors"))
    wrong = {"max_position_embeddings": 4096 + 1, "rope_theta": 12345.0, "rms_norm_eps": 1e-3,
             "num_attention_heads": cfg["num_attention_heads"] * 2, "num_key_value_heads": 7,
             "intermediate_size": cfg["intermediate_size"] + 1}  # fmt: skip
    (other / "config.json").write_text(json.dumps(cfg | wrong))
    problems = "\n".join(check_gguf(tiny_f16_gguf, other))
    for key in ("context_length", "rope.freq_base", "attention.layer_norm_rms_epsilon", "attention.head_count ",
                "attention.head_count_kv", "feed_forward_length"):  # fmt: skip
        assert f"llama.{key}" in problems, (key, problems)


def test_rewrite_string_changes_one_value_and_keeps_the_tensors(tiny_f16_gguf, tmp_path):
    copy = tmp_path / "c.gguf"
    shutil.copy(tiny_f16_gguf, copy)
    before = inspect_gguf(copy)
    assert rewrite_string(copy, "tokenizer.ggml.pre", "a-much-longer-pre-tokenizer-name") == "smollm"
    after = inspect_gguf(copy)
    assert after.tokenizer_pre == "a-much-longer-pre-tokenizer-name" and after.tensors == before.tensors
    assert rewrite_string(copy, "tokenizer.ggml.pre", None) == "a-much-longer-pre-tokenizer-name"
    with pytest.raises(GGUFReadError, match="no string metadata key"):
        rewrite_string(copy, "no.such.key", "x")


def test_rewrite_number_changes_one_value_in_place_and_refuses_a_string(tiny_f16_gguf, tmp_path):
    copy = tmp_path / "c.gguf"
    shutil.copy(tiny_f16_gguf, copy)
    before = inspect_gguf(copy)
    assert rewrite_number(copy, "llama.rope.freq_base", 20000.0) == before.metadata["llama.rope.freq_base"]
    after = inspect_gguf(copy)
    assert after.metadata["llama.rope.freq_base"] == 20000.0 and after.tensors == before.tensors
    assert copy.stat().st_size == tiny_f16_gguf.stat().st_size
    with pytest.raises(GGUFReadError, match="no numeric metadata key"):
        rewrite_number(copy, "tokenizer.ggml.pre", 1.0)
    with pytest.raises(GGUFReadError, match="is not a string"):
        rewrite_string(copy, "llama.rope.freq_base", "x")
