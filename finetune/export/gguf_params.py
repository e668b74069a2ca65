"""Llama hyper-parameters of an HF folder and the GGUF tensor layout llama.cpp expects for them."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.errors import UserError


class GGUFExportError(UserError):
    """The HF folder cannot be exported (unsupported architecture, tokenizer, weights)."""


@dataclass(frozen=True)
class LlamaParams:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    vocab_size: int
    n_ctx: int
    rope_theta: float
    rms_eps: float
    tied: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_scaling: dict[str, Any] | None = None


def llama_params(hf_dir: str | Path) -> LlamaParams:
    """Read config.json; transformers 5 moves rope_theta under rope_parameters, so read both places."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise GGUFExportError(f"{path}: not found (an HF model folder needs config.json)")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if cfg.get("model_type") != "llama":
        raise GGUFExportError(f"{path}: model_type {cfg.get('model_type')!r} is not supported (only 'llama')")
    if "quantization" in cfg or "quantization_config" in cfg:
        raise GGUFExportError(f"{path}: the model is quantized; fuse with dequantize=True first")
    try:
        n_embd, n_head = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        return LlamaParams(
            n_layer=int(cfg["num_hidden_layers"]),
            n_embd=n_embd,
            n_ff=int(cfg["intermediate_size"]),
            n_head=n_head,
            n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
            head_dim=int(cfg.get("head_dim") or n_embd // n_head),
            vocab_size=int(cfg["vocab_size"]),
            n_ctx=int(cfg.get("max_position_embeddings", 2048)),
            rope_theta=float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tied=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            rope_scaling=scaling,
        )
    except KeyError as exc:
        raise GGUFExportError(f"{path}: missing key {exc.args[0]!r}") from None


def expected_tensor_shapes(p: LlamaParams) -> dict[str, tuple[int, ...]]:
    """GGUF tensor names and ggml shapes (innermost dimension first) llama.cpp's llama loader expects."""
    q, kv = p.n_head * p.head_dim, p.n_head_kv * p.head_dim
    out: dict[str, tuple[int, ...]] = {"token_embd.weight": (p.n_embd, p.vocab_size)}
    out["output_norm.weight"] = (p.n_embd,)
    if not p.tied:
        out["output.weight"] = (p.n_embd, p.vocab_size)
    for i in range(p.n_layer):
        b = f"blk.{i}."
        out |= {
            b + "attn_norm.weight": (p.n_embd,),
            b + "attn_q.weight": (p.n_embd, q),
            b + "attn_k.weight": (p.n_embd, kv),
            b + "attn_v.weight": (p.n_embd, kv),
            b + "attn_output.weight": (q, p.n_embd),
            b + "ffn_norm.weight": (p.n_embd,),
            b + "ffn_gate.weight": (p.n_embd, p.n_ff),
            b + "ffn_up.weight": (p.n_embd, p.n_ff),
            b + "ffn_down.weight": (p.n_ff, p.n_embd),
        }
        if p.attention_bias:
            out |= {b + "attn_q.bias": (q,), b + "attn_k.bias": (kv,), b + "attn_v.bias": (kv,)}
            out[b + "attn_output.bias"] = (p.n_embd,)
        if p.mlp_bias:
            out |= {
                b + "ffn_gate.bias": (p.n_ff,),
                b + "ffn_up.bias": (p.n_ff,),
                b + "ffn_down.bias": (p.n_embd,),
            }
    return out
