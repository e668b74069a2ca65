"""Gemma 3's embedding scale, made to match the runtimes that ship: llama.cpp, Ollama and HF in float32.

mlx-lm multiplies Gemma 3's token embeddings by sqrt(hidden) rounded to bfloat16 (25.25 for
hidden 640); llama.cpp and transformers use the float32 value (25.2982). A 0.19% larger residual stream
moved next-token logprobs of a fine-tuned gemma3-270m by up to 0.22 between MLX and its float32 GGUF
(0.038 with the exact scale, measured), so a float32 model trained and judged in MLX would not be the one
that ships. exact_embed_scale() gives the loaded model's embedding the exact scale; parameters, adapters
and the tied LM head (as_linear) are untouched. Models in bfloat16 keep mlx-lm's rounding (identical there).
"""

from __future__ import annotations

from typing import Any

import mlx.core as mx
import mlx.nn as nn

SCALED_EMBEDDINGS = ("gemma3_text",)  # mlx-lm's gemma and gemma2 already use the exact float


class ExactScaleEmbedding(nn.Embedding):
    """nn.Embedding whose lookup is pre-multiplied so that the model's bfloat16 scale lands on sqrt(hidden)."""

    correction: float = 1.0

    def __call__(self, x: mx.array) -> mx.array:
        return super().__call__(x) * self.correction


def exact_embed_scale(model: Any) -> bool:
    """Switch a loaded mlx-lm Gemma to the exact embedding scale; False (nothing done) for other models."""
    inner = getattr(model, "model", None)
    args = getattr(model, "args", None) or getattr(inner, "args", None)
    embed = getattr(inner, "embed_tokens", None)
    if getattr(args, "model_type", None) not in SCALED_EMBEDDINGS or type(embed) is not nn.Embedding:
        return False
    if embed.weight.dtype != mx.float32:
        return False
    exact = args.hidden_size**0.5
    rounded = mx.array(exact, mx.bfloat16).astype(mx.float32).item()
    embed.__class__ = ExactScaleEmbedding  # this instance only: mlx-lm's class is left as it is
    embed.correction = exact / rounded
    return True
