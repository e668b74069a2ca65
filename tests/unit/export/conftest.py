"""Export fixtures: LoRA/DoRA adapters for the tiny HF Llama, as mlx-lm's trainer leaves them after some steps."""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

LORA = {"rank": 4, "dropout": 0.0, "scale": 2.0}
IDS = [19556, 905, 216, 1, 4093, 198, 33, 34, 35, 2]


def build_adapter(
    base: Path, out: Path, *, kind: str = "lora", seed: int = 0, lora: dict = LORA, layers: int = 2
) -> Path:
    """An adapter on the last `layers` blocks with lora_b moved off zero (a fused adapter at step 0 equals the base)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model, _ = load_model(base)  # model only: loading the tokenizer costs ~1 s each time
    model.freeze()
    linear_to_lora_layers(model, layers, lora, use_dora=kind == "dora")
    rng = np.random.default_rng(seed)
    params = dict(tree_flatten(model.trainable_parameters()))
    params |= {
        k: mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32))
        for k, v in params.items()
        if "lora_b" in k
    }
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), params)
    cfg = {"fine_tune_type": kind, "num_layers": layers, "lora_parameters": lora}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


@pytest.fixture
def make_adapter() -> Callable[..., Path]:
    return build_adapter


@pytest.fixture(scope="module")
def tiny_adapter(tiny_hf, tmp_path_factory) -> Path:
    """One LoRA adapter for the tiny model, shared read-only by a module's tests."""
    return build_adapter(tiny_hf, tmp_path_factory.mktemp("adapter") / "adapter")


def logits(path: Path, adapter: Path | None = None, ids: list[int] = IDS, f64: bool = False) -> np.ndarray:
    """The model's logits on IDS, loaded from disk (+ an adapter); f64: computed in float64 (a noise floor)."""
    import mlx.core as mx
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    model, _ = load_model(path)
    if adapter is not None:
        load_adapters(model, str(adapter))
    if f64:
        model.set_dtype(mx.float64)
        return np.array(model(mx.array([ids]))[0])
    return np.array(model(mx.array([ids]))[0].astype(mx.float32))


@pytest.fixture
def model_logits() -> Callable[..., np.ndarray]:
    return logits
