"""finetune.train.gemma_scale: a float32 Gemma 3 in MLX scales its embeddings by the exact sqrt(hidden)."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
from mlx_lm.models import gemma3_text, llama

from finetune.train.arch import ARCHS
from finetune.train.gemma_scale import ExactScaleEmbedding, exact_embed_scale

GEMMA = dict(model_type="gemma3_text", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
             num_attention_heads=2, head_dim=32, num_key_value_heads=1, vocab_size=100, sliding_window=8, sliding_window_pattern=2)  # fmt: skip


def first_block_input(model, ids):
    # the shortcut adapter's embedding mirrors the model's own (shortcut_plan checks it against model(ids))
    return np.array(ARCHS["gemma3_text"].embed(model, ids))


def test_gemma3_embeddings_get_the_exact_scale_and_keep_their_parameters():
    mx.random.seed(0)
    model = gemma3_text.Model(gemma3_text.ModelArgs(**GEMMA))
    ids = mx.array([[1, 2, 3, 50]])
    before = first_block_input(model, ids)
    names = sorted(k for k, _ in nn.utils.tree_flatten(model.parameters()))
    assert exact_embed_scale(model) is True
    assert type(model.model.embed_tokens) is ExactScaleEmbedding
    after = first_block_input(model, ids)
    raw = np.array(model.model.embed_tokens.weight)[[1, 2, 3, 50]]
    # mlx-lm: sqrt(64) = 8 is exact in bfloat16 too, so pick the ratio from the correction it computed
    np.testing.assert_allclose(after[0], raw * 64**0.5, rtol=1e-6)
    np.testing.assert_allclose(after / before, model.model.embed_tokens.correction, rtol=1e-5)
    assert sorted(k for k, _ in nn.utils.tree_flatten(model.parameters())) == names
    logits = model(ids)  # the model's own forward takes the corrected embedding too
    assert np.isfinite(np.array(logits)).all()


def test_a_hidden_size_whose_root_bfloat16_rounds_is_corrected():
    mx.random.seed(0)
    model = gemma3_text.Model(gemma3_text.ModelArgs(**{**GEMMA, "hidden_size": 640, "intermediate_size": 64}))
    ids = mx.array([[5, 7]])
    before = first_block_input(model, ids)
    exact_embed_scale(model)
    after = first_block_input(model, ids)
    raw = np.array(model.model.embed_tokens.weight)[[5, 7]]
    np.testing.assert_allclose(before[0], raw * 25.25, rtol=1e-6)  # mlx-lm's bfloat16 sqrt(640)
    np.testing.assert_allclose(after[0], raw * 640**0.5, rtol=1e-6)  # llama.cpp's and HF's


def test_other_models_and_bfloat16_gemma_are_left_alone():
    args = llama.ModelArgs(model_type="llama", hidden_size=32, num_hidden_layers=1, intermediate_size=64,
                           num_attention_heads=2, rms_norm_eps=1e-5, vocab_size=50, num_key_value_heads=1)  # fmt: skip
    assert exact_embed_scale(llama.Model(args)) is False
    bf16 = gemma3_text.Model(gemma3_text.ModelArgs(**GEMMA))
    bf16.set_dtype(mx.bfloat16)
    assert exact_embed_scale(bf16) is False and type(bf16.model.embed_tokens) is nn.Embedding
    assert exact_embed_scale(object()) is False
