"""finetune.models.tiny: the tiny-llama build (SmolLM2's tokenizer, random weights from a seed)."""

import json
import time

import numpy as np
import pytest

from finetune.models.cache import MARKER
from finetune.models.resolve import missing_files, resolve_model
from finetune.models.tiny import (
    EMBED_STD,
    TINY,
    TINY_CONFIG,
    TINY_SEED,
    tiny_llama_dirname,
    tiny_llama_weights,
)


def test_tiny_llama_is_a_complete_folder(tiny):
    assert missing_files(tiny.path) == []
    assert tiny.config == TINY_CONFIG
    tok_config = json.loads((tiny.path / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"] and tok_config["eos_token"] == "<|im_end|>"
    marker = json.loads((tiny.path / MARKER).read_text())
    assert marker["spec"] == TINY and marker["seed"] == TINY_SEED and marker["build_seconds"] >= 0


def test_tiny_llama_is_deterministic(tiny, tmp_path):
    from safetensors.numpy import save_file

    again = tmp_path / "again.safetensors"
    save_file(tiny_llama_weights(), str(again), metadata={"format": "pt"})
    assert again.read_bytes() == (tiny.path / "model.safetensors").read_bytes()
    other_seed = tiny_llama_weights(seed=1)["model.embed_tokens.weight"]
    assert not (other_seed == tiny_llama_weights()["model.embed_tokens.weight"]).all()


def test_tiny_llama_is_cached_and_keyed_by_config(tiny):
    start = time.perf_counter()
    assert resolve_model(TINY).path == tiny.path
    assert time.perf_counter() - start < 1.0  # no rebuild, no transformers import
    sha = json.loads((tiny.path / MARKER).read_text())["tokenizer_gguf_sha256"]
    assert tiny.path.name == tiny_llama_dirname(TINY_CONFIG, TINY_SEED, sha)
    bigger = {**TINY_CONFIG, "num_hidden_layers": 3}
    assert tiny_llama_dirname(bigger, TINY_SEED, sha) != tiny.path.name
    assert tiny_llama_dirname(TINY_CONFIG, 1, sha) != tiny.path.name
    assert tiny_llama_dirname(TINY_CONFIG, TINY_SEED, "0" * 64) != tiny.path.name


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": False},
        {"head_dim": 24},
        {"num_hidden_layers": 1, "num_key_value_heads": 4},
    ],
)
def test_weights_match_mlx_lm_llama_exactly(overrides):
    """Every name and shape mlx-lm's Llama expects, nothing more (strict load), matrices N(0, std), norms 1."""
    import mlx.core as mx
    from mlx_lm.models import llama

    cfg = {**TINY_CONFIG, "vocab_size": 300, **overrides}
    weights = tiny_llama_weights(cfg, seed=2)
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    model.load_weights([(k, mx.array(v)) for k, v in weights.items()], strict=True)
    assert all(v.dtype == np.float32 for v in weights.values())
    assert ("lm_head.weight" in weights) == (not cfg["tie_word_embeddings"])
    assert np.all(weights["model.norm.weight"] == 1.0)
    assert abs(weights["model.layers.0.mlp.up_proj.weight"].std() - cfg["initializer_range"]) < 0.01
    # the tied embedding is also the LM head: its own std (see EMBED_STD), whatever initializer_range says
    assert abs(weights["model.embed_tokens.weight"].std() - EMBED_STD) < 0.02
    wider = tiny_llama_weights({**cfg, "initializer_range": 0.2}, seed=2)
    assert abs(wider["model.layers.0.mlp.up_proj.weight"].std() - 0.2) < 0.01
    assert abs(wider["model.embed_tokens.weight"].std() - EMBED_STD) < 0.02


def test_tiny_llama_loads_and_trains_in_mlx(tiny):
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner import linear_to_lora_layers
    from mlx_lm.tuner.trainer import default_loss

    model, tokenizer = load(str(tiny.path))
    ids = tokenizer.encode("The capital of France is Paris.")
    assert tokenizer.eos_token == "<|im_end|>" and len(ids) > 3
    model.freeze()
    mx.random.seed(0)  # LoRA's A init is random: fixed so the loss check is not a coin flip
    linear_to_lora_layers(model, 2, {"rank": 4, "dropout": 0.0, "scale": 10.0})
    batch, lengths = mx.array([ids, ids]), mx.array([[0, len(ids)]] * 2)
    loss_and_grad = nn.value_and_grad(model, default_loss)
    opt = optim.Adam(learning_rate=1e-3)
    losses = []
    for _ in range(3):
        (loss, _), grads = loss_and_grad(model, batch, lengths)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
        losses.append(loss.item())
    assert losses[0] > 9.0  # at least ~ln(49152): random weights over the real vocab (std-1 rows: sharper)
    assert losses[-1] < losses[0]
