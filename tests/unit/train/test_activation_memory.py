"""finetune.train.activation_memory: what the trained span keeps for the backward pass, per fitted coefficient."""

import pytest

from finetune.train.activation_memory import CHECKPOINT_RECOMPUTE, DORA_PER_TOKEN, activation_bytes
from finetune.train.model_shape import ADAPTER_BYTES, ModelShape
from tests.unit.train.test_model_shape import SMOLLM2

BATCH, SEQ = 2, 64


@pytest.fixture
def smol() -> ModelShape:
    return ModelShape.from_hf_config({**SMOLLM2, "torch_dtype": "float32"})


def test_saved_activations_grow_with_the_trained_span(smol):
    none = activation_bytes(smol, BATCH, SEQ, 4, blocks=0)
    one = activation_bytes(smol, BATCH, SEQ, 4, blocks=1)
    four = activation_bytes(smol, BATCH, SEQ, 4, blocks=4)
    assert none.saved == 0 and none.transient == one.transient > 0  # the block in backward is there anyway
    assert four.saved == pytest.approx(4 * one.saved, abs=4)


def test_checkpointing_keeps_block_inputs_and_recomputes_one_block(smol):
    plain = activation_bytes(smol, BATCH, SEQ, 4, blocks=smol.num_layers)
    ckpt = activation_bytes(smol, BATCH, SEQ, 4, blocks=smol.num_layers, grad_checkpoint=True)
    assert ckpt.saved < plain.saved / 10
    per_block = plain.saved / smol.num_layers
    assert ckpt.transient == pytest.approx(CHECKPOINT_RECOMPUTE * per_block, rel=1e-6)


def test_adapted_linears_add_what_they_keep(smol):
    keys = ("self_attn.q_proj", "self_attn.v_proj")
    dims = smol.linear_shapes()
    tokens = BATCH * SEQ
    lora = activation_bytes(smol, BATCH, SEQ, 4, blocks=1, adapter_keys=keys)
    dora = activation_bytes(smol, BATCH, SEQ, 4, blocks=1, adapter_keys=keys, dora=True)
    # DoRA keeps each adapted linear's un-normalised output
    assert dora.saved - lora.saved == pytest.approx(
        DORA_PER_TOKEN * tokens * sum(dims[k][1] for k in keys) * 4, abs=1
    )
    # in half precision, x @ lora_a keeps a float32 copy of each adapted input
    half = activation_bytes(smol, BATCH, SEQ, 2, blocks=1, adapter_keys=keys)
    half_plain = activation_bytes(smol, BATCH, SEQ, 2, blocks=1)
    assert half.saved - half_plain.saved == pytest.approx(
        tokens * sum(dims[k][0] for k in keys) * ADAPTER_BYTES, abs=1
    )


def test_full_fine_tuning_keeps_a_little_more_per_block(smol):
    lora = activation_bytes(smol, BATCH, SEQ, 4, blocks=1)
    full = activation_bytes(smol, BATCH, SEQ, 4, blocks=1, full=True)
    assert lora.saved < full.saved < 1.2 * lora.saved
