"""Training-memory estimate for Llama-family models on MLX: LoRA, DoRA and full fine-tuning.

Predicts `mx.get_peak_memory()` over a training step as FineTune trains: mlx-lm's `train()` with our
masked cross-entropy, `finetune.train.prepare_model` (full = every parameter trainable), MLX's CPU
backend with MLX_DISABLE_COMPILE=1 (finetune.blas's default). Parameter counts are exact; the activation
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

DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
# mlx-lm creates lora_a, lora_b (and DoRA's magnitude m) in float32 whatever the model's dtype.
ADAPTER_BYTES = 4
# MLX's SGD allocates its momentum buffer even when momentum is 0.
OPTIMIZER_STATES = {"adam": 2, "adamw": 2, "sgd": 1}
FINE_TUNE_TYPES = ("lora", "dora", "full")
# Every Linear in a Llama block: mlx-lm's default LoRA keys when none are given.
BLOCK_LINEARS = (
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
)

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


@dataclass(frozen=True)
class ModelShape:
    """The dimensions of a Llama-family decoder that decide its memory."""

    hidden_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    tie_word_embeddings: bool = True
    attention_bias: bool = False
    mlp_bias: bool = False
    dtype: str = "float32"
    model_type: str = "llama"

    def __post_init__(self) -> None:
        for name in (
            "hidden_size",
            "num_layers",
            "num_heads",
            "num_kv_heads",
            "head_dim",
            "intermediate_size",
            "vocab_size",
        ):
            if getattr(self, name) < 1:
                raise ValueError(f"model shape: {name} must be >= 1, got {getattr(self, name)}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(
                f"model shape: num_attention_heads ({self.num_heads}) must be a multiple of "
                f"num_key_value_heads ({self.num_kv_heads})"
            )
        _dtype_bytes(self.dtype, "model shape: dtype")

    @classmethod
    def from_hf_config(cls, cfg: Mapping[str, Any]) -> ModelShape:
        """Read a Hugging Face config.json dict, with mlx-lm's defaults for missing optional keys."""
        if not isinstance(cfg, Mapping):
            raise TypeError(f"model config must be a dict (config.json), got {type(cfg).__name__}")
        if "hidden_size" not in cfg and isinstance(cfg.get("text_config"), Mapping):
            cfg = {**cfg["text_config"], **cfg}  # multimodal configs nest the language model's shape

        def need(key: str) -> int:
            if cfg.get(key) is None:
                raise ValueError(f"model config (config.json) is missing required key '{key}'")
            value = cfg[key]
            if isinstance(value, bool) or not isinstance(value, int):
                raise ValueError(f"model config key '{key}' must be an integer, got {value!r}")
            return value

        hidden, heads = need("hidden_size"), need("num_attention_heads")
        kv_heads = cfg.get("num_key_value_heads") or heads
        head_dim = cfg.get("head_dim") or hidden // heads
        dtype = cfg.get("torch_dtype") or cfg.get("dtype") or "float32"
        return cls(
            hidden_size=hidden,
            num_layers=need("num_hidden_layers"),
            num_heads=heads,
            num_kv_heads=int(kv_heads),
            head_dim=int(head_dim),
            intermediate_size=need("intermediate_size"),
            vocab_size=need("vocab_size"),
            # mlx-lm's Llama ties embeddings unless the config says otherwise (HF's default is untied).
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", True)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            dtype=str(dtype).removeprefix("torch."),
            model_type=str(cfg.get("model_type", "llama")),
        )

    @property
    def q_dim(self) -> int:
        return self.num_heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.num_kv_heads * self.head_dim

    def linear_shapes(self) -> dict[str, tuple[int, int]]:
        """(input, output) features of each Linear in one block, keyed like mlx-lm's module paths."""
        h, i = self.hidden_size, self.intermediate_size
        return {
            "self_attn.q_proj": (h, self.q_dim),
            "self_attn.k_proj": (h, self.kv_dim),
            "self_attn.v_proj": (h, self.kv_dim),
            "self_attn.o_proj": (self.q_dim, h),
            "mlp.gate_proj": (h, i),
            "mlp.up_proj": (h, i),
            "mlp.down_proj": (i, h),
        }

    @property
    def block_params(self) -> int:
        """Parameters of one transformer block (7 linears, their biases if any, 2 RMSNorms)."""
        total = 2 * self.hidden_size
        for key, (n_in, n_out) in self.linear_shapes().items():
            bias = self.mlp_bias if key.startswith("mlp.") else self.attention_bias
            total += n_in * n_out + (n_out if bias else 0)
        return total

    @property
    def embedding_params(self) -> int:
        return self.vocab_size * self.hidden_size

    @property
    def param_count(self) -> int:
        """Exact parameter count of mlx_lm.models.llama.Model built from the same config."""
        head = 0 if self.tie_word_embeddings else self.embedding_params
        return self.embedding_params + self.num_layers * self.block_params + self.hidden_size + head

    @property
    def block_width(self) -> int:
        """Activation elements per token of one block's main tensors (norm inputs/outputs, q/k/v, MLP)."""
        return 4 * self.hidden_size + 2 * self.q_dim + 2 * self.kv_dim + 3 * self.intermediate_size


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


# ---------------------------------------------------------------- parameters


def _dtype_bytes(dtype: str, what: str = "param_dtype") -> int:
    if dtype not in DTYPE_BYTES:
        raise ValueError(f"{what}: unsupported dtype {dtype!r}; expected one of {sorted(DTYPE_BYTES)}")
    return DTYPE_BYTES[dtype]


def resolve_lora_keys(shape: ModelShape, keys: Iterable[str] | None) -> tuple[str, ...]:
    """mlx-lm's keys: every Linear of a block when None; otherwise block-relative paths like 'self_attn.q_proj'."""
    if keys is None:
        return BLOCK_LINEARS
    if isinstance(keys, str):
        raise ValueError(f"lora keys must be a list of module paths, got the string {keys!r}")
    keys = tuple(keys)
    unknown = [k for k in keys if k not in BLOCK_LINEARS]
    if unknown:
        raise ValueError(
            f"lora keys {unknown} are not Linear layers of a {shape.model_type} block; "
            f"valid keys: {list(BLOCK_LINEARS)}"
        )
    if not keys:
        raise ValueError("lora keys is empty: no layer would get an adapter")
    return tuple(dict.fromkeys(keys))


def adapted_layers(shape: ModelShape, num_layers: int) -> int:
    """How many of the last blocks get adapters (-1 = all), as mlx-lm's linear_to_lora_layers counts them."""
    if num_layers == -1:
        return shape.num_layers
    if num_layers < 1:
        raise ValueError(f"lora num_layers must be -1 (all) or >= 1, got {num_layers}")
    return min(num_layers, shape.num_layers)  # mlx-lm adapts every block when asked for more than exist


def adapter_param_count(
    shape: ModelShape,
    *,
    rank: int,
    keys: Iterable[str] | None = None,
    num_layers: int = -1,
    dora: bool = False,
) -> int:
    """Exact trainable parameters mlx-lm adds: r*(in+out) per adapted Linear, plus `out` magnitudes for DoRA."""
    if rank < 1:
        raise ValueError(f"lora rank must be >= 1, got {rank}")
    dims = shape.linear_shapes()
    per_block = sum(
        rank * (dims[k][0] + dims[k][1]) + (dims[k][1] if dora else 0) for k in resolve_lora_keys(shape, keys)
    )
    return adapted_layers(shape, num_layers) * per_block


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
) -> MemoryEstimate:
    """Predict the peak training memory of one step.

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
    logits = LOGIT_COPIES * tokens * shape.vocab_size * pb
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
        moments.update(_update_moments(shape, pb, states, acts.saved, tokens * shape.vocab_size * pb))
    phase = max(moments, key=lambda k: sum(moments[k].values()))

    breakdown = {
        "weights": shape.param_count * pb + adapters * ADAPTER_BYTES,
        "optimizer": states * train_bytes,
        **{k: int(v) for k, v in moments[phase].items()},
    }
    inputs = {
        "batch_size": batch_size,
        "seq_len": seq_len,
        "lora_rank": lora_rank,
        "lora_num_layers": lora_num_layers,
        "lora_keys": list(lora_keys) if lora_keys is not None else None,
        "grad_checkpoint": grad_checkpoint,
        "param_dtype": dtype,
        "optimizer": optimizer,
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


def from_run_config(model_config: Mapping[str, Any], run: Any) -> MemoryEstimate:
    """Estimate for a FineTune RunConfig (or anything with .training, .data and .lora like it)."""
    t, lora = run.training, run.lora
    return estimate(
        ModelShape.from_hf_config(model_config),
        fine_tune_type=t.fine_tune_type,
        batch_size=t.batch_size,
        seq_len=run.data.max_seq_length,
        lora_rank=lora.rank,
        lora_num_layers=lora.num_layers,
        lora_keys=lora.keys,
        grad_checkpoint=t.grad_checkpoint,
        optimizer=t.optimizer,
    )


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
