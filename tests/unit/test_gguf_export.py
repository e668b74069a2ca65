"""GGUF export: llama.cpp's tokenizer fields, tensor layout, and check_gguf failing on broken files."""

from __future__ import annotations

import dataclasses
import json
import shutil

import numpy as np
import pytest

from finetune.gguf_export import export_gguf, load_hf_tensors, permute_qk
from finetune.gguf_inspect import check_gguf, inspect_gguf
from finetune.gguf_params import GGUFExportError, expected_tensor_shapes, llama_params
from finetune.gguf_tokenizer import build_tokenizer_spec

# --------------------------------------------------------------------------- pure pieces


def test_permute_qk_interleaves_rotate_half_pairs():
    # One head of dim 4: HF rotates pairs (0,2),(1,3); llama.cpp wants them adjacent: rows 0,2,1,3.
    w = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
    assert permute_qk(w, 1).tolist() == w[[0, 2, 1, 3]].tolist()
    # GQA: K has n_head_kv heads, each permuted on its own.
    k = np.arange(8, dtype=np.float32).reshape(8, 1)
    assert permute_qk(k, 4, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_llama_params_reads_transformers5_rope_parameters(tmp_path):
    cfg = {
        "model_type": "llama",
        "hidden_size": 64,
        "num_attention_heads": 4,
        "num_hidden_layers": 2,
        "intermediate_size": 128,
        "vocab_size": 100,
        "rope_parameters": {"rope_theta": 100000.0, "rope_type": "default"},
    }
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    p = llama_params(tmp_path)
    assert (p.rope_theta, p.head_dim, p.n_head_kv, p.rope_scaling) == (100000.0, 16, 4, None)
    shapes = expected_tensor_shapes(p)
    assert shapes["blk.1.attn_k.weight"] == (64, 64) and "output.weight" in shapes


@pytest.mark.parametrize(
    ("patch", "message"),
    [({"model_type": "gemma3"}, "model_type 'gemma3'"), ({"quantization": {"bits": 4}}, "quantized")],
)
def test_llama_params_refuses_what_it_cannot_export(tmp_path, patch, message):
    cfg = {
        "model_type": "llama",
        "hidden_size": 8,
        "num_attention_heads": 2,
        "num_hidden_layers": 1,
        "intermediate_size": 16,
        "vocab_size": 10,
    } | patch
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(GGUFExportError, match=message):
        llama_params(tmp_path)


def test_load_hf_tensors_decodes_bf16_and_f16(tmp_path):
    import mlx.core as mx

    x = [[1.5, -2.25], [3.0, 0.0078125]]  # exactly representable in bf16 and f16
    mx.save_safetensors(
        str(tmp_path / "model.safetensors"),
        {"a": mx.array(x).astype(mx.bfloat16), "b": mx.array(x).astype(mx.float16)},
    )
    got = load_hf_tensors(tmp_path)
    assert got["a"].dtype == np.float32 and got["a"].tolist() == x == got["b"].tolist()


def test_inspect_gguf_rejects_a_non_gguf_file(tmp_path):
    bad = tmp_path / "x.gguf"
    bad.write_bytes(b"not a gguf at all")
    with pytest.raises(GGUFExportError, match="not a GGUF file"):
        inspect_gguf(bad)


# --------------------------------------------------------------------------- export on the tiny model


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


def test_q8_0_quantizes_matrices_and_keeps_norms_f32(tiny_hf, tiny_spec, tiny_f16_gguf, tmp_path):
    out = export_gguf(tiny_hf, tmp_path / "q8.gguf", outtype="q8_0", tokenizer_spec=tiny_spec)
    types = {t.name: t.type for t in inspect_gguf(out).tensors}
    assert types["token_embd.weight"] == types["blk.1.ffn_down.weight"] == "Q8_0"
    assert types["output_norm.weight"] == "F32"
    assert out.stat().st_size < tiny_f16_gguf.stat().st_size
    assert check_gguf(out, tiny_hf, spec=tiny_spec) == []


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


def test_unrecognised_bpe_pre_tokenizer_is_an_error_not_a_guess(tiny_hf):
    class OtherBpe:  # a BPE tokenizer whose pre-tokenizer hash llama.cpp does not know
        def get_vocab(self):
            return {"a": 0}

        def get_added_vocab(self):
            return {}

        added_tokens_decoder: dict = {}

        def encode(self, text, add_special_tokens=True):
            return [0] * len(text)

    with pytest.raises(GGUFExportError, match="pre-tokenizer not recognised"):
        build_tokenizer_spec(tiny_hf, vocab_size=1, tokenizer=OtherBpe())


def test_failed_export_leaves_no_file_behind(tiny_hf, tiny_spec, tmp_path):
    with pytest.raises(TypeError):
        export_gguf(
            tiny_hf, tmp_path / "x.gguf", tokenizer_spec=dataclasses.replace(tiny_spec, chat_template=123)
        )
    assert list(tmp_path.iterdir()) == []
