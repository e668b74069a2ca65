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

from finetune.train.activation_memory import Activations, activation_bytes
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

__all__ = [
    "BLOCK_LINEARS",
    "DTYPE_BYTES",
    "ModelShape",
    "adapted_layers",
    "adapter_param_count",
    "estimate",
    "resolve_lora_keys",
]

# ---- fitted to measured MLX peaks (bench/calibrate_memory.py); activations' own are in activation_memory.
# Vocabulary-sized buffers alive at the loss: logits, shifted logits, exp, their gradient.
LOGIT_COPIES = 4
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
    _check_inputs(fine_tune_type, optimizer, batch_size, seq_len)
    dtype = param_dtype or shape.dtype
    pb = _dtype_bytes(dtype)
    states = OPTIMIZER_STATES[optimizer]
    trained = _trained(shape, fine_tune_type, pb, lora_rank, lora_num_layers, lora_keys)
    acts = _activations(shape, batch_size, seq_len, pb, trained, grad_checkpoint)
    tokens = batch_size * seq_len
    head_tokens = tokens if loss_tokens is None else max(1, min(loss_tokens, tokens))
    phase, moment = _peak_moment(shape, pb, states, trained, acts, head_tokens)
    breakdown = _breakdown(shape, pb, states, trained, moment, cache_tokens)
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
        trainable_params=trained.params,
        total_params=shape.param_count + trained.adapters,
        fine_tune_type=fine_tune_type,
        peak_phase=phase if phase == "loss" else "update",
        inputs=inputs,
    )


def _check_inputs(fine_tune_type: str, optimizer: str, batch_size: int, seq_len: int) -> None:
    if fine_tune_type not in FINE_TUNE_TYPES:
        raise ValueError(f"fine_tune_type must be one of {list(FINE_TUNE_TYPES)}, got {fine_tune_type!r}")
    if optimizer not in OPTIMIZER_STATES:
        raise ValueError(f"optimizer must be one of {sorted(OPTIMIZER_STATES)}, got {optimizer!r}")
    if batch_size < 1 or seq_len < 1:
        raise ValueError(f"batch_size and seq_len must be >= 1, got {batch_size} and {seq_len}")


@dataclass(frozen=True)
class _Trained:
    """What a fine-tune type trains: which blocks, adapted keys, and how many parameters (bytes) get gradients."""

    full: bool
    dora: bool
    keys: tuple[str, ...]  # adapted linears (none for full fine-tuning)
    blocks: int  # blocks in the trained span
    adapters: int  # adapter parameters added to the model
    params: int
    bytes: int


def _trained(
    shape: ModelShape,
    fine_tune_type: str,
    pb: int,
    lora_rank: int,
    lora_num_layers: int,
    lora_keys: Iterable[str] | None,
) -> _Trained:
    if fine_tune_type == "full":
        n = shape.param_count
        return _Trained(True, False, (), shape.num_layers, 0, n, n * pb)
    keys = resolve_lora_keys(shape, lora_keys)
    dora = fine_tune_type == "dora"
    adapters = adapter_param_count(shape, rank=lora_rank, keys=keys, num_layers=lora_num_layers, dora=dora)
    blocks = adapted_layers(shape, lora_num_layers)
    return _Trained(False, dora, keys, blocks, adapters, adapters, adapters * ADAPTER_BYTES)


def _activations(
    shape: ModelShape, batch_size: int, seq_len: int, pb: int, trained: _Trained, grad_checkpoint: bool
) -> Activations:
    return activation_bytes(
        shape,
        batch_size,
        seq_len,
        pb,
        blocks=trained.blocks,
        grad_checkpoint=grad_checkpoint,
        adapter_keys=trained.keys,
        dora=trained.dora,
        full=trained.full,
    )


def _peak_moment(
    shape: ModelShape, pb: int, states: int, trained: _Trained, acts: Activations, head_tokens: int
) -> tuple[str, dict[str, int]]:
    """The moment of a step with the most bytes alive: its name and what is alive then."""
    # The loss moment: every saved activation plus the loss buffers. Adapter gradients are tiny and
    # counted whole; full gradients do not exist yet.
    one_logits = head_tokens * shape.vocab_size * pb
    moments = {
        "loss": {
            "activations": acts.saved + acts.transient,
            "logits": LOGIT_COPIES * one_logits,
            "gradients": 0 if trained.full else trained.bytes,
        }
    }
    if trained.full:
        moments.update(_update_moments(shape, pb, states, acts.saved, one_logits))
    phase = max(moments, key=lambda k: sum(moments[k].values()))
    return phase, moments[phase]


def _breakdown(
    shape: ModelShape, pb: int, states: int, trained: _Trained, moment: dict[str, int], cache_tokens: int
) -> dict[str, int]:
    """What is alive at the peak: the weights and optimizer states always, then the peak moment's own."""
    breakdown = {
        "weights": shape.param_count * pb + trained.adapters * ADAPTER_BYTES,
        "optimizer": states * trained.bytes,
        **{k: int(v) for k, v in moment.items()},
    }
    if cache_tokens:
        breakdown["prefix_cache"] = cache_tokens * shape.hidden_size * pb
    return breakdown


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
    shortcuts build it: trimmed after its last trained token, the LM head only where the loss is. With ranks > 1,
    one rank's: the whole model, optimizer and cache, and rank 0's share of each batch (local ranks: N x it)."""
    t, lora, shape = run.training, run.lora, ModelShape.from_hf_config(model_config)
    batch = per_rank_batch(t.batch_size, t.ranks)
    seq_len, loss_tokens, cache_tokens = run.data.max_seq_length, None, 0
    stats = (data or {}).get("length_stats") if (data or {}).get("length_unit") == "tokens" else None
    trained = (data or {}).get("trained_tokens") or {}
    if stats:
        seq_len = min(int(stats["max"]), run.data.max_seq_length)
        seq_len = min(seq_len, int(trained["last"])) if t.trim_batches and trained.get("last") else seq_len
        if t.loss_positions_only and trained.get("max"):
            loss_tokens = batch * int(trained["max"])
        if t.cache_frozen_prefix and t.fine_tune_type != "full" and prefix_applies(shape, lora):
            cache_tokens = int(trained.get("positions") or 0)
    return estimate(
        shape,
        fine_tune_type=t.fine_tune_type,
        batch_size=batch,
        seq_len=max(1, seq_len),
        lora_rank=lora.rank,
        lora_num_layers=lora.num_layers,
        lora_keys=lora.keys,
        grad_checkpoint=t.grad_checkpoint,
        optimizer=t.optimizer,
        loss_tokens=loss_tokens,
        cache_tokens=cache_tokens,
    )


def per_rank_batch(batch_size: int, ranks: int) -> int:
    """Rows of each global batch the busiest rank trains on (finetune.train.distributed.shard: rank 0's)."""
    return -(-batch_size // max(1, ranks))


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
