"""Evaluate fixtures: the tiny HF Llama loaded once, a LoRA adapter for it, and data prepared with its tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tests.conftest import ADDITION_ROWS


@pytest.fixture(scope="session")
def tiny_model(tiny_hf):
    """(model, tokenizer) of the tiny Llama as decode.load gives them (mlx-lm's tokenizer wrapper)."""
    from finetune.evaluate import decode

    return decode.load(tiny_hf)


@pytest.fixture(scope="session")
def tiny_lora(tiny_hf, tmp_path_factory) -> Path:
    """A LoRA adapter on every block of the tiny Llama with lora_b moved off zero, so it changes answers."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    lora = {"rank": 8, "dropout": 0.0, "scale": 20.0}
    model, _ = load_model(tiny_hf)
    model.freeze()
    linear_to_lora_layers(model, 2, lora)
    rng = np.random.default_rng(3)
    params = dict(tree_flatten(model.trainable_parameters()))
    params |= {
        k: mx.array(rng.normal(0, 0.2, v.shape).astype(np.float32))
        for k, v in params.items()
        if "lora_b" in k
    }
    out = tmp_path_factory.mktemp("lora") / "adapter"
    out.mkdir()
    mx.save_safetensors(str(out / "adapters.safetensors"), params)
    (out / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "num_layers": 2, "lora_parameters": lora})
    )
    return out


@pytest.fixture(scope="session")
def tiny_sums_dir(tiny_hf, tmp_path_factory) -> Path:
    """ADDITION_ROWS prepared with the tiny Llama's (SmolLM2's) tokenizer, chatml, 64 tokens; read-only."""
    from finetune.data.prepare import prepare
    from finetune.models.tokenizer import load_tokenizer

    root = tmp_path_factory.mktemp("tiny-sums")
    src = root / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ADDITION_ROWS))
    prepare(src, root / "prepared", template="chatml", tokenizer=load_tokenizer(tiny_hf), max_seq_length=64)
    return root / "prepared"
