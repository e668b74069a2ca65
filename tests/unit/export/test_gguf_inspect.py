"""Reading a GGUF without llama.cpp, and check_gguf failing on what llama.cpp would refuse or misread."""

from __future__ import annotations

import dataclasses
import json
import shutil

import pytest

from finetune.export.gguf_export import export_gguf
from finetune.export.gguf_inspect import check_gguf, inspect_gguf
from finetune.export.gguf_params import GGUFExportError


def test_inspect_gguf_rejects_a_non_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(GGUFExportError, match="not a GGUF file"):
        inspect_gguf(bad)


def test_export_writes_the_tokenizer_llamacpp_expects(tiny_f16_gguf, tiny_hf, tiny_spec):
    from transformers import AutoTokenizer

    info = inspect_gguf(tiny_f16_gguf)
    hf = AutoTokenizer.from_pretrained(str(tiny_hf))
    assert info.architecture == "llama"
    assert (info.tokenizer_model, info.tokenizer_pre, info.token_type_kind) == ("gpt2", "smollm", "INT32")
    assert (
        len(info.tokens) == 49152 and info.tokens[1] == "<|im_start|>" and info.token_types[1] == 3
    )  # CONTROL
    assert len(info.merges) == len(json.loads((tiny_hf / "tokenizer.json").read_text())["model"]["merges"])
    assert info.special_ids["bos"] == hf.bos_token_id and info.special_ids["eos"] == hf.eos_token_id
    assert info.add_bos is False  # SmolLM2 adds no BOS
    assert info.chat_template == hf.chat_template and "<|im_start|>" in info.chat_template
    names = {t.name: t for t in info.tensors}
    assert "output.weight" not in names  # tied embeddings
    assert names["blk.0.attn_k.weight"].shape == (64, 32) and names["blk.0.attn_k.weight"].type == "F16"
    assert names["blk.0.attn_norm.weight"].type == "F32"
    assert check_gguf(tiny_f16_gguf, tiny_hf, spec=tiny_spec) == []


def test_check_gguf_flags_an_export_done_mlx_lms_way(tiny_hf, tiny_spec, tmp_path):
    import mlx.core as mx
    from mlx_lm.gguf import convert_to_gguf

    config = json.loads((tiny_hf / "config.json").read_text())
    out = tmp_path / "mlx-lm.gguf"
    convert_to_gguf(tiny_hf, mx.load(str(tiny_hf / "model.safetensors")), config, str(out))
    problems = "\n".join(check_gguf(out, tiny_hf, spec=tiny_spec))
    assert "tokenizer.ggml.model is 'llama', the HF tokenizer needs 'gpt2'" in problems
    assert "array of UINT32" in problems
    assert "0 merges" in problems
    assert "no tokenizer.chat_template" in problems


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"chat_template": None}, "no tokenizer.chat_template"),
        ({"chat_template": "{{ messages }}"}, "chat_template differs"),
        ({"merges": []}, "0 merges"),
        ({"token_types": [1] * 49152}, "token types differ from HF at 17 ids"),
        ({"add_bos": True}, "add_bos_token is True"),
        ({"pre": "gpt-2"}, "tokenizer.ggml.pre is 'gpt-2', expected 'smollm'"),
        ({"special_ids": {}}, "eos token id is None, HF says 2"),
    ],
)
def test_check_gguf_flags_each_tokenizer_defect(tiny_hf, tiny_spec, tmp_path, change, message):
    out = export_gguf(tiny_hf, tmp_path / "bad.gguf", tokenizer_spec=dataclasses.replace(tiny_spec, **change))
    problems = check_gguf(out, tiny_hf, spec=tiny_spec)
    assert any(message in p for p in problems), problems


def test_check_gguf_flags_shapes_that_do_not_match_the_config(tiny_hf, tiny_spec, tiny_f16_gguf, tmp_path):
    other = tmp_path / "hf"
    shutil.copytree(tiny_hf, other, ignore=shutil.ignore_patterns("*.safetensors"))
    cfg = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps(cfg | {"num_hidden_layers": 3, "intermediate_size": 96}))
    problems = "\n".join(check_gguf(tiny_f16_gguf, other, spec=tiny_spec))
    assert "llama.block_count is 2, HF config says 3" in problems
    assert "missing tensors ['blk.2." in problems
    assert "tensor blk.0.ffn_up.weight has shape (64, 128), expected (64, 96)" in problems
