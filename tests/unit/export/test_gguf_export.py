"""The hand-written Llama GGUF writer (ported as is: llama.cpp's converter will replace it)."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from finetune.export.gguf_export import export_gguf, load_hf_tensors, permute_qk
from finetune.export.gguf_inspect import check_gguf, inspect_gguf


def test_permute_qk_interleaves_rotate_half_pairs():
    # One head of dim 4: HF rotates pairs (0,2),(1,3); llama.cpp wants them adjacent: rows 0,2,1,3.
    w = np.arange(4 * 3, dtype=np.float32).reshape(4, 3)
    assert permute_qk(w, 1).tolist() == w[[0, 2, 1, 3]].tolist()
    # GQA: K has n_head_kv heads, each permuted on its own.
    k = np.arange(8, dtype=np.float32).reshape(8, 1)
    assert permute_qk(k, 4, 2)[:, 0].tolist() == [0, 2, 1, 3, 4, 6, 5, 7]


def test_load_hf_tensors_decodes_bf16_and_f16(tmp_path):
    import mlx.core as mx

    x = [[1.5, -2.25], [3.0, 0.0078125]]  # exactly representable in bf16 and f16
    mx.save_safetensors(
        str(tmp_path / "model.safetensors"),
        {"a": mx.array(x).astype(mx.bfloat16), "b": mx.array(x).astype(mx.float16)},
    )
    got = load_hf_tensors(tmp_path)
    assert got["a"].dtype == np.float32 and got["a"].tolist() == x == got["b"].tolist()


def test_q8_0_quantizes_matrices_and_keeps_norms_f32(tiny_hf, tiny_spec, tiny_f16_gguf, tmp_path):
    out = export_gguf(tiny_hf, tmp_path / "q8.gguf", outtype="q8_0", tokenizer_spec=tiny_spec)
    types = {t.name: t.type for t in inspect_gguf(out).tensors}
    assert types["token_embd.weight"] == types["blk.1.ffn_down.weight"] == "Q8_0"
    assert types["output_norm.weight"] == "F32"
    assert out.stat().st_size < tiny_f16_gguf.stat().st_size
    assert check_gguf(out, tiny_hf, spec=tiny_spec) == []


def test_failed_export_leaves_no_file_behind(tiny_hf, tiny_spec, tmp_path):
    with pytest.raises(TypeError):
        export_gguf(
            tiny_hf, tmp_path / "x.gguf", tokenizer_spec=dataclasses.replace(tiny_spec, chat_template=123)
        )
    assert list(tmp_path.iterdir()) == []
