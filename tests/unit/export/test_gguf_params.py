"""Llama hyper-parameters read from an HF config for the GGUF writer (ported as is: the writer is being replaced)."""

from __future__ import annotations

import json

import pytest

from finetune.export.gguf_params import GGUFExportError, expected_tensor_shapes, llama_params


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
