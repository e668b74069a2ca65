"""Fuse a trained LoRA/DoRA adapter into its base model and write a full-precision HF folder.

Follows mlx_lm/fuse.py (`.fuse()` on every adapted module, `update_modules(tree_unflatten(...))`, `save`),
but never re-quantizes: a quantized base is de-quantized, so the folder can be exported to GGUF as is.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from finetune import faults
from finetune.errors import UserError
from finetune.export.layout import same_layout, to_base_layout
from finetune.models.convert import EXPORT_OVERRIDES
from finetune.system.atomic import atomic_dir
from finetune.train.setup import final_norm

ADAPTER_FILES = ("adapters.safetensors", "adapter_config.json")
# A base model's files for GGUF export that mlx-lm's save does not copy (SentencePiece model, the staged
# tokenizer config Gemma's conversion needs): the fused folder must export like the base would.
EXPORT_EXTRAS = ("tokenizer.model", EXPORT_OVERRIDES)
FINE_TUNE_TYPES = ("lora", "dora", "full")
DTYPES = ("float32", "float16", "bfloat16")


class FuseError(UserError):
    """The adapter or base cannot be fused (missing files, bad adapter_config.json, nothing to fuse)."""


def read_adapter_config(adapter_path: str | Path) -> dict[str, Any]:
    """Validate an adapter folder the way mlx_lm.load(adapter_path=) will read it, with clearer errors."""
    adapter_path = Path(adapter_path)
    for name in ADAPTER_FILES:
        if not (adapter_path / name).is_file():
            raise FuseError(
                f"{adapter_path / name}: not found (an adapter folder needs {' and '.join(ADAPTER_FILES)})"
            )
    path = adapter_path / "adapter_config.json"
    try:
        cfg = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise FuseError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg})") from None
    kind = cfg.get("fine_tune_type", "lora")
    if kind not in FINE_TUNE_TYPES:
        raise FuseError(f"{path}: fine_tune_type {kind!r} is not one of {FINE_TUNE_TYPES}")
    if not isinstance(cfg.get("num_layers"), int):
        raise FuseError(f"{path}: num_layers must be an integer (got {cfg.get('num_layers')!r})")
    if kind != "full":
        lora = cfg.get("lora_parameters")
        if not isinstance(lora, dict):
            raise FuseError(f"{path}: lora_parameters must be an object with rank, dropout, scale")
        if missing := [k for k in ("rank", "dropout", "scale") if k not in lora]:
            raise FuseError(f"{path}: lora_parameters is missing {', '.join(missing)}")
    return cfg


def fuse(
    base_path: str | Path,
    adapter_path: str | Path,
    out_dir: str | Path,
    *,
    dequantize: bool = True,
    dtype: str | None = None,
) -> Path:
    """Load base + adapter with mlx_lm, fuse, and write an HF folder (weights, config, tokenizer) atomically.

    dequantize=True (default) turns a quantized base into full precision; dtype=None keeps the base's float
    dtype, "float32" keeps small LoRA deltas that bf16 would round away.
    """
    if dtype is not None and dtype not in DTYPES:
        raise FuseError(f"dtype {dtype!r}: choose one of {DTYPES} or None (keep the base's)")
    base_path, adapter_path, out_dir = Path(base_path), Path(adapter_path), Path(out_dir)
    if not (base_path / "config.json").is_file():
        raise FuseError(f"{base_path}: not an HF model folder (no config.json)")
    kind = read_adapter_config(adapter_path).get("fine_tune_type", "lora")

    import mlx.core as mx
    from mlx.utils import tree_map, tree_unflatten
    from mlx_lm.utils import dequantize_model, load, save

    model, tokenizer, config = load(str(base_path), adapter_path=str(adapter_path), return_config=True)
    fused = [(name, m.fuse(dequantize=dequantize)) for name, m in model.named_modules() if hasattr(m, "fuse")]
    if not fused and kind != "full":
        raise FuseError(f"{adapter_path}: no {kind} layers were found in the model after loading the adapter")
    if fused:
        model.update_modules(tree_unflatten(fused))
    model = faults.point("fuse_drops_adapter", model, base_path)
    model = faults.point("fuse_scales_tensor", model, final_norm)
    if dequantize:
        model = dequantize_model(model)
        config.pop("quantization", None)
        config.pop("quantization_config", None)
    if dtype is not None:
        target = getattr(mx, dtype)
        floating = (mx.float32, mx.float16, mx.bfloat16)
        model.update(tree_map(lambda p: p.astype(target) if p.dtype in floating else p, model.parameters()))
        config["torch_dtype"] = config["dtype"] = dtype
    config = faults.point("fuse_config_drift", config)
    mx.eval(model.parameters())
    with atomic_dir(out_dir) as tmp:
        save(tmp, str(base_path), model, tokenizer, config, donate_model=False)
        to_base_layout(tmp, base_path)
        for extra in EXPORT_EXTRAS:  # files the GGUF converter needs that mlx-lm's save drops
            if (base_path / extra).exists():
                copy = shutil.copytree if (base_path / extra).is_dir() else shutil.copy2
                copy(base_path / extra, tmp / extra)
        if problems := same_layout(base_path, tmp):
            raise FuseError(
                f"{out_dir}: the fused weights are not in the base's layout: {'; '.join(problems[:4])}"
            )
    return out_dir
