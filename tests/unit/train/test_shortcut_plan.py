"""The plan: which exact shortcuts apply to a model as prepared for training, and why they do not when not."""

from __future__ import annotations

import mlx.core as mx
import pytest
from mlx_lm.tuner.utils import linear_to_lora_layers

from finetune.train import shortcuts as sc
from finetune.train.batches import make_iterate_batches, masked_loss
from tests.unit.train.test_shortcuts import CONFIGS, attach, build, toy_dataset


def test_every_block_adapted_no_prefix():
    model = attach(build("llama-tied"), 4)
    p = sc.plan(model)
    assert p.cut == 0 and p.loss_positions
    assert "no cached prefix: block 0 has adapters" in p.summary()


def test_full_finetune_no_prefix():
    model = build("llama-tied")
    model.unfreeze()
    p = sc.plan(model)
    assert p.cut == 0 and "embedding is trainable" in p.summary()


def test_lora_on_embedding_no_prefix():
    model = attach(build("llama-untied"), 2)
    mx.random.seed(3)
    from mlx_lm.tuner.lora import LoRAEmbedding

    model.model.embed_tokens = LoRAEmbedding.from_base(model.model.embed_tokens, r=4)
    p = sc.plan(model)
    assert p.cut == 0 and "embedding is trainable" in p.summary()


def test_frozen_adapter_with_dropout_below_limits_the_cut():
    model = attach(build("llama-tied"), 4, dropout=0.1)
    for block in model.layers[:2]:
        block.freeze()  # frozen adapters in blocks 0-1, but their dropout still draws random masks
    p = sc.plan(model)
    assert p.cut == 0 and "block 0 has active dropout" in p.summary()


def test_cut_follows_trainable_blocks():
    model = attach(build("llama-tied"), 3, keys=["mlp.down_proj"])
    assert sc.plan(model).cut == 1


def test_unknown_architecture_falls_back():
    import importlib

    phi = importlib.import_module("mlx_lm.models.phi")
    mx.random.seed(0)
    model = phi.Model(phi.ModelArgs(model_type="phi", hidden_size=64, num_attention_heads=4, num_hidden_layers=2,
                                    intermediate_size=128, vocab_size=512))  # fmt: skip
    model.freeze()
    linear_to_lora_layers(model, 1, {"rank": 4, "scale": 20.0, "dropout": 0.0})
    p = sc.plan(model)
    assert not p.active and p.arch is None and "unknown architecture" in p.summary()
    assert sc.make_loss(p) is masked_loss
    ds = toy_dataset(8)
    a = next(sc.make_iterate_batches(p, None, 0)(ds, 4, 256, loop=True))
    b = next(make_iterate_batches(0)(ds, 4, 256, loop=True))
    assert len(a) == 2 and mx.array_equal(a[0], b[0]) and mx.array_equal(a[1], b[1])


@pytest.mark.parametrize("factor", [2.0, 1 + 1e-4])
def test_adapter_drift_is_caught(factor):
    """A model whose forward differs from the adapter (e.g. a new mlx-lm adds a logit transform) is refused,
    down to a drift of 1e-4 (smaller than Gemma 3's bfloat16-rounded embedding scale, 1.7e-3): the self-check
    allows K_VERIFY x the floor it measures (~4e-7 relative on these models)."""
    from mlx_lm.models import llama

    class Drifted(llama.Model):
        def __call__(self, inputs, cache=None, input_embeddings=None):
            return factor * super().__call__(inputs, cache, input_embeddings)

    Drifted.__module__ = "mlx_lm.models.llama"
    mx.random.seed(0)
    model = attach(Drifted(llama.ModelArgs.from_dict(CONFIGS["llama-tied"])), 2)
    p = sc.plan(model)
    assert not p.active and "does not reproduce" in p.summary() and "noise floor" in p.summary()


@pytest.mark.parametrize("name", list(CONFIGS))
def test_self_check_passes_with_its_floor(name):
    p = sc.plan(attach(build(name), 2))
    assert p.active and "adapter checked against model(ids)" in p.summary() and "noise floor" in p.summary()


def test_length_dependent_rope_refuses_length_changes():
    cfg = dict(
        CONFIGS["llama-tied"], rope_scaling={"type": "dynamic", "factor": 2.0}, max_position_embeddings=16
    )
    from mlx_lm.models import llama

    mx.random.seed(0)
    model = attach(llama.Model(llama.ModelArgs.from_dict(cfg)), 2)
    p = sc.plan(model)
    assert p.cut == 0 and p.trim == 0 and p.loss_positions  # gathering the head does not change L
    assert "DynamicNTKScalingRoPE depends on the sequence length" in p.summary()


def test_budget_refuses_prefix():
    model = attach(build("llama-tied"), 2)
    ds = toy_dataset(24)
    p = sc.plan(model, datasets=[ds], max_seq_length=256, cache_budget_bytes=1000)
    assert p.cut == 0 and p.loss_positions and "budget" in p.summary()


def test_plan_does_not_touch_rng_or_mode():
    model = attach(build("llama-tied"), 2, dropout=0.1)
    model.train()
    mx.random.seed(7)
    sc.setup(model, seed=0, max_seq_length=256, train_set=toy_dataset(8))
    after = mx.random.uniform(shape=(4,))
    mx.random.seed(7)
    assert mx.array_equal(after, mx.random.uniform(shape=(4,))) and model.training
