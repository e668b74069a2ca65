"""Activation memory of a training step: what the trained span of blocks keeps for the backward pass.

Coefficients fitted to measured MLX peaks of random-weight Llamas (bench/calibrate_memory.py); the estimate
that adds weights, optimizer states and the loss buffers to these is finetune.train.memory.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from finetune.train.model_shape import ADAPTER_BYTES, ModelShape

# ---- fitted to measured MLX peaks (bench/calibrate_memory.py); units are elements of the model dtype.
# Saved for the backward pass, per token per trained block, times block_width.
ACT_PER_TOKEN = 1.34
# Saved attention buffers per trained block, times batch * heads * seq_len**2.
ACT_ATTENTION = 0.68
# Backward transients of the block being processed: per token (times block_width) and per score.
TRANSIENT_PER_TOKEN = 1.07
TRANSIENT_ATTENTION = 2.66
# Gradient checkpointing: each block keeps its input (times hidden per token); the block being
# recomputed briefly holds its saved activations.
CHECKPOINT_INPUT = 0.76
CHECKPOINT_RECOMPUTE = 0.91
# DoRA keeps each adapted linear's un-normalised output (elements per output feature per token).
DORA_PER_TOKEN = 1.0
# Full fine-tuning keeps a little more per block than LoRA (cotangents held for weight gradients).
FULL_SAVED_EXTRA = 0.1


@dataclass(frozen=True)
class Activations:
    saved: int  # kept from the forward pass until the backward pass uses it
    transient: int  # the block being processed in the backward pass


def activation_bytes(
    shape: ModelShape,
    batch: int,
    seq: int,
    pb: int,
    *,
    blocks: int,
    grad_checkpoint: bool = False,
    adapter_keys: Iterable[str] = (),
    dora: bool = False,
    full: bool = False,
) -> Activations:
    """Activation bytes of the trained span: blocks before the first trained one keep nothing."""
    tokens = batch * seq
    scores = batch * shape.num_heads * seq * seq
    dims = shape.linear_shapes()
    per_block = (ACT_PER_TOKEN * tokens * shape.block_width + ACT_ATTENTION * scores) * pb
    if dora:
        per_block += DORA_PER_TOKEN * tokens * sum(dims[k][1] for k in adapter_keys) * pb
    if pb != ADAPTER_BYTES:
        # x @ lora_a promotes a half-precision input to a float32 copy, which the backward pass keeps.
        per_block += tokens * sum(dims[k][0] for k in adapter_keys) * ADAPTER_BYTES
    if full:
        per_block *= 1 + FULL_SAVED_EXTRA
    if grad_checkpoint:
        saved = CHECKPOINT_INPUT * tokens * shape.hidden_size * pb * blocks
        transient = CHECKPOINT_RECOMPUTE * per_block
    else:
        saved = per_block * blocks
        transient = (TRANSIENT_PER_TOKEN * tokens * shape.block_width + TRANSIENT_ATTENTION * scores) * pb
    return Activations(int(saved), int(transient))
