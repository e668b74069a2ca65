"""The shape of a Llama-family decoder and its exact parameter counts (full model and LoRA/DoRA adapters).

finetune.train.memory builds its training-memory estimate on these.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
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
        if cfg.get("model_type") == "gpt2":
            cfg = _with_llama_names(cfg)

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


def _with_llama_names(gpt2: Mapping[str, Any]) -> dict[str, Any]:
    """A GPT-2 config under Llama's names; its 2-matrix MLP is priced as Llama's 3 (an upper bound)."""
    return {
        **gpt2,
        "hidden_size": gpt2.get("n_embd"),
        "num_hidden_layers": gpt2.get("n_layer"),
        "num_attention_heads": gpt2.get("n_head"),
        "intermediate_size": gpt2.get("n_inner") or 4 * gpt2["n_embd"],
        "tie_word_embeddings": gpt2.get("tie_word_embeddings", True),
    }
