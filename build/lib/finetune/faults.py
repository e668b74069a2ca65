"""Fault injection: plant a known fault into the real pipeline, to prove the gate meant for it catches it.

    FT_INJECT_FAULT=adapter_scale_zero finetune run ...     (several: comma-separated)

Each fault is planted at one documented point of the product code (grep for its name); nothing is patched
from outside. The active faults are part of every stage's cache key, so a faulty run never reuses a
healthy run's stage results, or the other way round. docs/fault-injection.md is the suite's table.
"""

from __future__ import annotations

import os
from collections.abc import Mapping

ENV = "FT_INJECT_FAULT"

# name -> (where it is planted, the gate that must catch it)
FAULTS: dict[str, tuple[str, str]] = {
    "lr_zero": ("train: the optimizer's learning rate is 0", "loss_convergence"),
    "frozen_lora": ("train: LoRA gradients are zeroed before every update", "parameter_updates"),
    "base_weight_trained": ("train: one base tensor is left trainable and trained", "parameter_updates"),
    "mask_prompt_ignored": ("train: prompt tokens are trained (loss mask all ones)", "label_mask"),
    "adapter_scale_zero": ("train: the saved adapter_config.json says scale 0", "artifacts"),
    "adapter_truncated": ("train: the saved adapters.safetensors is cut in half", "artifacts"),
    "fuse_drops_adapter": ("fuse: the fused folder is the base model", "fuse_exactness"),
    "fuse_scales_tensor": ("fuse: one untouched tensor is scaled by 1.02", "fuse_exactness"),
    "gguf_pretokenizer_mislabelled": (
        "gguf: tokenizer.ggml.pre names another pre-tokenizer",
        "gguf_tokenizer",
    ),
    "modelfile_wrong_template": ("ollama: the Modelfile TEMPLATE is another chat format's", "served_answers"),
    "modelfile_no_stop": ("ollama: the Modelfile has no stop strings", "served_template"),
    "eval_runtime_base": ("evaluate: the fused-MLX runtime answers with the base model", "output_parity"),
    "disk_full_checkpoint": ("train: writing a checkpoint fails with ENOSPC", "(stage error)"),
}


def injected(env: Mapping[str, str] | None = None) -> list[str]:
    """The active faults; an unknown name is an error (a typo must not make a fault suite pass)."""
    raw = (os.environ if env is None else env).get(ENV, "")
    names = [n.strip() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        raise ValueError(f"{ENV}: unknown fault(s) {unknown}; known: {', '.join(FAULTS)}")
    return names


def active(name: str) -> bool:
    if name not in FAULTS:
        raise KeyError(f"no fault named {name!r}")
    return name in injected()
