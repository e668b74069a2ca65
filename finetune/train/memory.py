"""Training-memory estimate for Llama-family models on MLX: LoRA, DoRA and full fine-tuning.

Predicts `mx.get_peak_memory()` over a training step as FineTune trains: mlx-lm's `train()` with our
masked cross-entropy, `finetune.train.prepare_model` (full = every parameter trainable), MLX's CPU
backend with MLX_DISABLE_COMPILE=1 (finetune.system.blas's default). Parameter counts are exact; the activation
coefficients below are fitted to measured peaks of random-weight Llamas (bench/calibrate_memory.py
prints predicted vs measured: 176 runs fit within 10.5%, the float32 LoRA/DoRA ones within 4%).

The peak is the largest of these moments of a step:
  loss              end of the forward pass: saved activations + the vocabulary-sized loss buffers.
  update (full)     a tensor being updated: its gradient, new weight and new optimizer states coexist
                    with the old ones; the largest tensor is the embedding (about 3.4x its size with Adam)
                    or, for small vocabularies, a transformer block.
Measured, not assumed: in bfloat16/float16, LoRA's `x @ lora_a` promotes each adapted input to a float32
copy that the backward pass keeps, so a half-precision LoRA run can peak above full fine-tuning.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from typing import Any

from finetune.train.model_shape import (
    ADAPTER_BYTES,
    BLOCK_LINEARS,
    DTYPE_BYTES,
    FINE_TUNE_TYPES,
    OPTIMIZER_STATES,
    ModelShape,
    _dtype_bytes,
    adapted_layers,
    adapter_param_count,
    resolve_lora_keys,
)

__all__ = ["BLOCK_LINEARS", "DTYPE_BYTES", "ModelShape", "adapted_layers", "adapter_param_count", "estimate",
           "resolve_lora_keys"]  # fmt: skip

# ---- fitted to measured MLX peaks (bench/calibrate_memory.py); units are elements of the model dtype.
# Saved for the backward pass, per token per trained block, times block_width.
ACT_PER_TOKEN = 1.34
# Saved attention buffers per trained block, times batch * heads * seq_len**2.
ACT_ATTENTION = 0.68
# Backward transients of the block being processed: per token (times block_width) and per score.
TRANSIENT_PER_TOKEN = 1.07
TRANSIENT_ATTENTION = 2.66
# Vocabulary-sized buffers alive at the loss: logits, shifted logits, exp, their gradient.
LOGIT_COPIES = 4
# Gradient checkpointing: each block keeps its input (times hidden per token); the block being
# recomputed briefly holds its saved activations.
CHECKPOINT_INPUT = 0.76
CHECKPOINT_RECOMPUTE = 0.91
# DoRA keeps each adapted linear's un-normalised output (elements per output feature per token).
DORA_PER_TOKEN = 1.0
# Full fine-tuning keeps a little more per block than LoRA (cotangents held for weight gradients).
FULL_SAVED_EXTRA = 0.1
# Updating the (tied) embedding: its two partial gradients and their sum, times the embedding.
EMBED_GRAD_COPIES = 1.36


@dataclass
class MemoryEstimate:
    """Predicted peak bytes of one training step; `breakdown` sums to `total_bytes`."""

    breakdown: dict[str, int]
    trainable_params: int
    total_params: int
    fine_tune_type: str
    peak_phase: str
    inputs: dict[str, Any] = field(default_factory=dict)

    @property
    def total_bytes(self) -> int:
        return int(sum(self.breakdown.values()))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["total_bytes"] = self.total_bytes
        out["trainable_fraction"] = self.trainable_params / self.total_params if self.total_params else 0.0
        return out


@dataclass(frozen=True)
class MemoryComparison:
    predicted: int
    measured: int
    error_pct: float  # (predicted - measured) / measured * 100: positive means we over-estimate

    def within(self, tolerance_pct: float = 15.0) -> bool:
        return abs(self.error_pct) <= tolerance_pct

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- the estimate


def estimate(
    shape: ModelShape,
    *,
    fine_tune_type: str,
    batch_size: int,
    seq_len: int,
    lora_rank: int = 8,
    lora_num_layers: int = -1,
    lora_keys: Iterable[str] | None = None,
    grad_checkpoint: bool = False,
    param_dtype: str | None = None,
    optimizer: str = "adam",
    loss_tokens: int | None = None,
    cache_tokens: int = 0,
) -> MemoryEstimate:
    """Predict the peak training memory of one step.

    With the exact shortcuts (finetune.train.shortcuts): loss_tokens is how many positions per batch reach the
    LM head (None: all of them, the plain path), cache_tokens how many positions the frozen-prefix cache holds
    (one hidden vector each).

    seq_len is the number of tokens the model sees per sequence; with mlx-lm's padding that is at most
    max_seq_length (so passing max_seq_length gives an upper bound). param_dtype defaults to the dtype of
    the model's weights (config.json), which MLX keeps when loading. `full` trains every parameter, as
    finetune.train.prepare_model does (mlx-lm's own CLI would train only the last num_layers blocks).
    """
    if fine_tune_type not in FINE_TUNE_TYPES:
        raise ValueError(f"fine_tune_type must be one of {list(FINE_TUNE_TYPES)}, got {fine_tune_type!r}")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATES)}, got {optimizer!r}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")
    dtype = param_dtype or shape.dtype
    pb = _dtype_bytes(dtype)
    full = fine_tune_type == "full"
    states = OPTIMIZER_STATES[optimizer]
    tokens = batch_size * seq_len

    keys: tuple[str, ...] = ()
    if full:
        trainable, train_bytes, adapters = shape.param_count, shape.param_count * pb, 0
        blocks = shape.num_layers
    else:
        keys = resolve_lora_keys(shape, lora_keys)
        blocks = adapted_layers(shape, lora_num_layers)
        adapters = adapter_param_count(
            shape, rank=lora_rank, keys=keys, num_layers=lora_num_layers, dora=fine_tune_type == "dora"
        )
        trainable, train_bytes = adapters, adapters * ADAPTER_BYTES

    acts = activation_bytes(
        shape,
        batch_size,
        seq_len,
        pb,
        blocks=blocks,
        grad_checkpoint=grad_checkpoint,
        adapter_keys=keys,
        dora=fine_tune_type == "dora",
        full=full,
    )
    head_tokens = tokens if loss_tokens is None else max(1, min(loss_tokens, tokens))
    logits = LOGIT_COPIES * head_tokens * shape.vocab_size * pb
    # The loss moment: every saved activation plus the loss buffers. Adapter gradients are tiny and
    # counted whole; full gradients do not exist yet.
    moments = {
        "loss": {
            "activations": acts.saved + acts.transient,
            "logits": logits,
            "gradients": 0 if full else train_bytes,
        }
    }
    if full:
        moments.update(_update_moments(shape, pb, states, acts.saved, head_tokens * shape.vocab_size * pb))
    phase = max(moments, key=lambda k: sum(moments[k].values()))

    breakdown = {
        "weights": shape.param_count * pb + adapters * ADAPTER_BYTES,
        "optimizer": states * train_bytes,
        **{k: int(v) for k, v in moments[phase].items()},
    }
    if cache_tokens:
        breakdown["prefix_cache"] = cache_tokens * shape.hidden_size * pb
    inputs = {
        "batch_size": batch_size,
        "seq_len": seq_len,
        "lora_rank": lora_rank,
        "lora_num_layers": lora_num_layers,
        "lora_keys": list(lora_keys) if lora_keys is not None else None,
        "grad_checkpoint": grad_checkpoint,
        "param_dtype": dtype,
        "optimizer": optimizer,
        "loss_tokens": loss_tokens,
        "cache_tokens": cache_tokens,
        "model": asdict(shape),
    }
    return MemoryEstimate(
        breakdown=breakdown,
        trainable_params=trainable,
        total_params=shape.param_count + adapters,
        fine_tune_type=fine_tune_type,
        peak_phase=phase if phase == "loss" else "update",
        inputs=inputs,
    )


def _update_moments(shape: ModelShape, pb: int, states: int, saved: int, one_logits: int) -> dict[str, dict]:
    """Full fine-tuning's optimizer update: a tensor's gradient, new weight and new states coexist with the old."""
    block = shape.block_params * pb
    embed = shape.embedding_params * pb
    # Untied models also hold lm_head's gradient and the blocks' activations while the embedding updates.
    held = 0 if shape.tie_word_embeddings else 2 * saved
    return {
        "update_blocks": {"activations": saved, "logits": 0, "gradients": (2 + states) * block},
        "update_embedding": {
            "activations": held,
            "logits": one_logits,
            "gradients": int((EMBED_GRAD_COPIES + states) * embed),
        },
    }


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


def predicted_saving(shape: ModelShape, **run: Any) -> float:
    """1 - adapter peak / full fine-tuning peak, for the same model, batch and length."""
    run = dict(run)
    kind = run.pop("fine_tune_type", "lora")
    kind = kind if kind in ("lora", "dora") else "lora"
    lora = estimate(shape, fine_tune_type=kind, **run).total_bytes
    full = estimate(shape, fine_tune_type="full", **run).total_bytes
    return 1 - lora / full


def compare(estimate: MemoryEstimate, measured_peak_bytes: int) -> MemoryComparison:
    """Predicted vs measured peak (mx.get_peak_memory()); error is relative to the measurement."""
    if measured_peak_bytes <= 0:
        raise ValueError(f"measured peak must be > 0 bytes, got {measured_peak_bytes}")
    predicted = estimate.total_bytes
    error = (predicted - measured_peak_bytes) / measured_peak_bytes * 100
    return MemoryComparison(predicted, int(measured_peak_bytes), round(error, 2))


def from_run_config(
    model_config: Mapping[str, Any], run: Any, data: Mapping[str, Any] | None = None
) -> MemoryEstimate:
    """Estimate for a FineTune RunConfig; with `data` (a prepare_report.json) the batch is priced as the
    shortcuts really build it: trimmed to the longest row, the LM head only where the loss is."""
    t, lora = run.training, run.lora
    shape = ModelShape.from_hf_config(model_config)
    seq_len, loss_tokens, cache_tokens = run.data.max_seq_length, None, 0
    stats = (data or {}).get("length_stats") if (data or {}).get("length_unit") == "tokens" else None
    trained = (data or {}).get("trained_tokens") or {}
    if stats:
        seq_len = min(int(stats["max"]), run.data.max_seq_length)
        if t.loss_positions_only and trained.get("max"):
            loss_tokens = t.batch_size * int(trained["max"])
        if t.cache_frozen_prefix and t.fine_tune_type != "full" and prefix_applies(shape, lora):
            cache_tokens = int(trained.get("positions") or 0)
    return estimate(
        shape,
        fine_tune_type=t.fine_tune_type,
        batch_size=t.batch_size,
        seq_len=max(1, seq_len),
        lora_rank=lora.rank,
        lora_num_layers=lora.num_layers,
        lora_keys=lora.keys,
        grad_checkpoint=t.grad_checkpoint,
        optimizer=t.optimizer,
        loss_tokens=loss_tokens,
        cache_tokens=cache_tokens,
    )


def prefix_applies(shape: ModelShape, lora: Any) -> bool:
    """The config-level view of finetune.train.shortcut_plan: some blocks below the adapted ones (LoRA dropout
    acts inside adapted blocks only, so it does not move the cut)."""
    return adapted_layers(shape, lora.num_layers) < shape.num_layers


# ---------------------------------------------------------------- rendering


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def format_estimate(est: MemoryEstimate) -> str:
    """A Markdown table of the breakdown (readable as plain text too)."""
    total = est.total_bytes or 1
    i = est.inputs
    lines = [
        f"Memory estimate: {est.fine_tune_type}, batch {i.get('batch_size')} x {i.get('seq_len')} tokens, "
        f"{i.get('param_dtype')}, {i.get('optimizer')}"
        + (", gradient checkpointing" if i.get("grad_checkpoint") else ""),
        "",
        "| component | bytes | share |",
        "|---|---:|---:|",
    ]
    for name, value in est.breakdown.items():
        lines.append(f"| {name} | {human_bytes(value)} | {value / total:.0%} |")
    lines.append(f"| **total (peak at {est.peak_phase})** | **{human_bytes(est.total_bytes)}** | 100% |")
    lines.append("")
    share = est.trainable_params / est.total_params if est.total_params else 0.0
    lines.append(f"trainable parameters: {est.trainable_params:,} of {est.total_params:,} ({share:.2%})")
    return "\n".join(lines)
