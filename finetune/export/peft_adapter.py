"""The trained adapter as PEFT ships it: adapter_model.safetensors + adapter_config.json for transformers + peft.

mlx-lm's LoRA computes W x + scale * (x @ lora_a) @ lora_b, with lora_a (in, r) and lora_b (r, out). PEFT
computes W x + (lora_alpha / r) * B(A(x)), with A.weight (r, in) and B.weight (out, r). So A = lora_a^T,
B = lora_b^T and lora_alpha = scale * r: an export that writes alpha = r (or no alpha: PEFT's default 8)
applies the adapter at a fraction of its strength and nothing complains; finetune.evaluate.adapter_measure
is what notices.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np

from finetune import faults
from finetune.export.fuse import FuseError, read_adapter_config
from finetune.system.atomic import atomic_write_bytes, atomic_write_text

PEFT_WEIGHTS = "adapter_model.safetensors"
PEFT_CONFIG = "adapter_config.json"
# Where mlx-lm's module paths differ from the Hugging Face model's (mlx-lm's GPT-2 calls `transformer` `model`).
HF_PREFIX = {"gpt2": ("model.", "transformer.")}
CONV1D = ("gpt2",)  # HF stores these weights (in, out): PEFT must be told (fan_in_fan_out)


def _hf_module(path: str, model_type: str) -> str:
    ours, theirs = HF_PREFIX.get(model_type, ("", ""))
    return theirs + path[len(ours) :] if ours and path.startswith(ours) else path


def _block(module: str) -> tuple[int, str]:
    """(block index, the name of the block list) of a module path: model.layers.22.mlp.up_proj -> (22, layers)."""
    parts = module.split(".")
    i = next(i for i, p in enumerate(parts) if p.isdigit())
    return int(parts[i]), parts[i - 1]


def export_peft(
    adapter_dir: Path,
    base_dir: Path,
    out_dir: Path,
    *,
    base_name: str | None = None,
    weight_layout: bool = False,
) -> dict[str, Any]:
    """Write out_dir as a PEFT LoRA adapter of base_dir; returns its adapter_config.json.

    weight_layout: for llama.cpp's convert_lora_to_gguf.py, which reads B @ A as a delta of the HF weight
    as stored and ignores fan_in_fan_out: a Conv1D weight (GPT-2) is stored (in, out), so A and B are given
    as B^T and A^T (measured: otherwise llama.cpp refuses 'blk.0.attn_qkv.weight has incorrect shape')."""
    from safetensors.numpy import load_file, save

    acfg = read_adapter_config(adapter_dir)
    if acfg.get("fine_tune_type", "lora") != "lora":
        raise FuseError(f"{adapter_dir}: a {acfg['fine_tune_type']} adapter has no PEFT LoRA form")
    lora = acfg["lora_parameters"]
    model_type = json.loads((Path(base_dir) / "config.json").read_text()).get("model_type", "")
    weights = load_file(str(Path(adapter_dir) / "adapters.safetensors"))
    tensors, modules = {}, set()
    for key, value in sorted(weights.items()):
        module, _, part = key.rpartition(".")
        if part not in ("lora_a", "lora_b"):
            raise FuseError(f"{adapter_dir}: {key} is not a LoRA tensor (lora_a / lora_b)")
        hf = _hf_module(module, model_type)
        swap = weight_layout and model_type in CONV1D  # (B @ A)^T = A^T B^T: lora_b is A, lora_a is B
        name = ("lora_B" if swap else "lora_A") if part == "lora_a" else ("lora_A" if swap else "lora_B")
        tensors[f"base_model.model.{hf}.{name}.weight"] = np.ascontiguousarray(
            (value if swap else value.T).astype(np.float32)
        )
        modules.add(hf.rsplit(".", 1)[-1])
    rank = int(lora["rank"])
    blocks = {_block(module) for module in (k.removeprefix("base_model.model.") for k in tensors)}
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_name or str(base_dir),
        "r": rank,
        "lora_alpha": faults.point("peft_alpha_missing", float(lora["scale"]) * rank, rank),
        "lora_dropout": float(lora.get("dropout", 0.0)),
        "target_modules": sorted(modules),
        # only the adapted blocks: without these PEFT adds (zero) LoRA layers to every block and warns
        "layers_to_transform": sorted({index for index, _ in blocks}),
        "layers_pattern": sorted({pattern for _, pattern in blocks}),
        "fan_in_fan_out": model_type in CONV1D and not weight_layout,
        "bias": "none",
        "inference_mode": True,
    }
    out = Path(out_dir)  # files written atomically one by one: out may be a user's folder FineTune marked
    atomic_write_bytes(out / PEFT_WEIGHTS, save(tensors))
    atomic_write_text(out / PEFT_CONFIG, json.dumps(config, indent=2) + "\n")
    return config
