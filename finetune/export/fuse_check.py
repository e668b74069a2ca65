"""Measure how exactly a fused folder is base + adapter: read base, fused and the saved adapter from disk.

Weights are compared in MLX's naming (mlx_lm.utils.load_model on both folders applies the same sanitize), so
the check holds for any architecture mlx-lm loads. mlx-lm's LoRALinear.fuse computes
W + (scale * B^T) @ A^T; the reference here is the same formula in float64.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from finetune.gates.fuse import FuseMeasurement
from finetune.models.safetensors import load_file


def _weights(folder: Path) -> dict[str, np.ndarray]:
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(folder), lazy=True)
    return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters())}


def measure_fuse(base_dir: Path, adapter_dir: Path, fused_dir: Path) -> FuseMeasurement:
    acfg = json.loads((Path(adapter_dir) / "adapter_config.json").read_text())
    scale = float(acfg["lora_parameters"]["scale"])
    adapter = load_file(Path(adapter_dir) / "adapters.safetensors")
    base, fused = _weights(base_dir), _weights(fused_dir)
    modules = sorted({k.rsplit(".", 1)[0] for k in adapter if k.endswith((".lora_a", ".lora_b"))})
    adapted, deltas = {}, {}
    for mod in modules:
        key = f"{mod}.weight"
        a, b = adapter[f"{mod}.lora_a"].astype(np.float64), adapter[f"{mod}.lora_b"].astype(np.float64)
        delta = (scale * b.T) @ a.T
        if key not in base or key not in fused:
            continue
        err = np.abs(fused[key].astype(np.float64) - (base[key].astype(np.float64) + delta)).max()
        size = float(np.abs(delta).max())
        deltas[mod] = size
        # relative to the delta (a dropped adapter then measures 1.0); an all-zero delta compares absolutely
        adapted[mod] = float(err / size) if size > 0 else float(err)
    touched = {f"{m}.weight" for m in modules}
    others = sorted(k for k in base if k not in touched)
    changed = [k for k in others if k in fused and not np.array_equal(base[k], fused[k])]
    missing = sorted(set(base) ^ set(fused))
    missing += [f"{m}.weight (adapted) not in the base" for m in modules if f"{m}.weight" not in base]
    return FuseMeasurement(adapted, deltas, changed, missing, len(others))


# What a fuse may change in config.json: the weights' dtype (and drop a quantization, which stage_fuse requires).
CONFIG_MAY_CHANGE = ("torch_dtype", "dtype", "quantization", "quantization_config", "transformers_version")


def config_changes(base: dict, fused: dict, may_change: tuple[str, ...] = CONFIG_MAY_CHANGE) -> list[str]:
    """Keys of the fused config.json that differ from the base's (context length, rope, heads, ...), named."""
    return [
        f"config.json {key}: base {base.get(key)!r}, fused {fused.get(key)!r}"
        for key in sorted(set(base) | set(fused))
        if key not in may_change and base.get(key) != fused.get(key)
    ]
