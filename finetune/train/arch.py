"""The forward pass of each mlx-lm architecture split into the pieces the exact training shortcuts need.

Each adapter mirrors its model's own __call__ for a full sequence without a KV cache (training): the
embedding (block 0's input), the blocks with the masks the model would pass them, the final norm, and the
head with any logit transform. finetune.train.shortcut_plan re-checks an adapter against model(ids) on the
live model, so a changed mlx-lm falls back to the plain path instead of drifting.

Supported (mlx_lm.models.<name>): llama (and those remapped to it, e.g. mistral), qwen2, qwen3, gemma2 (final
logit soft-capping), gemma3_text (scaled embeddings, sliding-window layers), gpt2 (learned positions).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx_lm.models.base import create_attention_mask


@dataclass(frozen=True)
class Arch:
    """How one mlx-lm architecture computes logits, split into the pieces the shortcuts need.

    Every function mirrors the model's own __call__ for a full sequence without a KV cache (training).
    """

    name: str
    embed: Callable[[Any, mx.array], mx.array]  # ids (B, L) -> input of block 0
    blocks: Callable[[Any], list]  # the transformer blocks, in order
    masks: Callable[[Any, mx.array], list]  # h (B, L, D) -> the mask the model passes to each block
    norm: Callable[[Any, mx.array], mx.array]  # final norm (per position)
    head_module: Callable[[Any], nn.Module]  # the module holding the head's weights
    head: Callable[[Any, mx.array], mx.array]  # normed h -> logits, including any logit transform
    pre_block: Callable[[Any], list]  # modules used before block 0 (embeddings)
    check: Callable[[Any], str | None] = lambda _m: None  # a reason to refuse this model instance


def _tied(model) -> bool:
    args = getattr(model, "args", None)
    if hasattr(model, "tie_word_embeddings"):  # gemma3_text decides at load time (sanitize)
        return bool(model.tie_word_embeddings)
    return bool(getattr(args, "tie_word_embeddings", True))


def _embedding_head_module(model):
    return model.model.embed_tokens if _tied(model) else model.lm_head


def _embedding_head(model, h):
    return model.model.embed_tokens.as_linear(h) if _tied(model) else model.lm_head(h)


def _llama_masks(model, h):
    inner = model.model
    full = create_attention_mask(h, None)
    if getattr(inner, "swa_idx", None) is None:
        return [full] * len(inner.layers)
    sliding = create_attention_mask(h, None, window_size=inner.sliding_window)
    return [sliding if layer.use_sliding else full for layer in inner.layers]


def _pipeline_check(model) -> str | None:
    if getattr(model.model, "pipeline_size", 1) != 1:
        return "pipeline-parallel model (layers split across ranks)"
    return None


def _causal_masks(model, h):
    return [create_attention_mask(h, None)] * len(model.layers)


def _gemma3_embed(model, ids):
    h = model.model.embed_tokens(ids)
    # Gemma 3 rounds sqrt(hidden) to bfloat16 before scaling; the exact same constant keeps us bitwise equal.
    return h * mx.array(model.model.args.hidden_size**0.5, mx.bfloat16).astype(h.dtype)


def _gemma3_masks(model, h):
    inner = model.model
    pattern = inner.sliding_window_pattern
    full = create_attention_mask(h, None)
    sliding = create_attention_mask(h, None, window_size=inner.window_size) if pattern > 1 else None
    return [full if i % pattern == pattern - 1 else sliding for i in range(len(inner.layers))]


def _gemma2_head(model, h):
    out = model.model.embed_tokens.as_linear(h)
    cap = model.final_logit_softcapping  # element-wise per position, so gathering first is still exact
    return mx.tanh(out / cap) * cap


def _gpt2_embed(model, ids):
    inner = model.model
    return inner.wte(ids) + inner.wpe(mx.arange(ids.shape[1]))


def _llama_like(name: str, check=None, masks=_causal_masks) -> Arch:
    return Arch(
        name=name,
        embed=lambda m, ids: m.model.embed_tokens(ids),
        blocks=lambda m: m.model.layers,
        masks=masks,
        norm=lambda m, h: m.model.norm(h),
        head_module=_embedding_head_module,
        head=_embedding_head,
        pre_block=lambda m: [m.model.embed_tokens],
        check=check or (lambda _m: None),
    )


ARCHS: dict[str, Arch] = {
    "llama": _llama_like("llama", masks=_llama_masks),
    "qwen2": _llama_like("qwen2", check=_pipeline_check),
    "qwen3": _llama_like("qwen3"),
    "gemma3_text": Arch(
        name="gemma3_text",
        embed=_gemma3_embed,
        blocks=lambda m: m.model.layers,
        masks=_gemma3_masks,
        norm=lambda m, h: m.model.norm(h),
        head_module=_embedding_head_module,
        head=_embedding_head,
        pre_block=lambda m: [m.model.embed_tokens],
    ),
    "gemma2": Arch(
        name="gemma2",
        embed=lambda m, ids: m.model.embed_tokens(ids) * (m.model.args.hidden_size**0.5),
        blocks=lambda m: m.model.layers,
        masks=lambda m, h: [create_attention_mask(h, None, return_array=True)] * len(m.model.layers),
        norm=lambda m, h: m.model.norm(h),
        head_module=lambda m: m.model.embed_tokens,
        head=_gemma2_head,
        pre_block=lambda m: [m.model.embed_tokens],
    ),
    "gpt2": Arch(
        name="gpt2",
        embed=_gpt2_embed,
        blocks=lambda m: m.model.h,
        masks=_causal_masks,
        norm=lambda m, h: m.model.ln_f(h),
        head_module=lambda m: m.model.wte,
        head=lambda m, h: m.model.wte.as_linear(h),
        pre_block=lambda m: [m.model.wte, m.model.wpe],
    ),
}


def arch_of(model) -> Arch | None:
    """The adapter for this model's mlx-lm module (mistral etc. load as mlx_lm.models.llama)."""
    module = type(model).__module__
    if not module.startswith("mlx_lm.models."):
        return None
    return ARCHS.get(module.rsplit(".", 1)[-1])


def run_blocks(model, arch: Arch, h: mx.array, start: int, stop: int) -> mx.array:
    """Blocks [start, stop) on h, with the masks the full model would use for h's length."""
    masks = arch.masks(model, h)
    for i, block in enumerate(arch.blocks(model)[start:stop], start):
        h = block(h, masks[i])
    return h


def arch_logits(model, arch: Arch, ids: mx.array) -> mx.array:
    """The full forward pass through the adapter (equals model(ids))."""
    h = run_blocks(model, arch, arch.embed(model, ids), 0, len(arch.blocks(model)))
    return arch.head(model, arch.norm(model, h))
