"""Fault injection: plant a known fault into the real pipeline, to prove the gate meant for it catches it.

    FT_INJECT_FAULT=adapter_scale_zero finetune run ...     (several: comma-separated)

Each fault is planted at one documented point of the product code (grep for its name); nothing is patched
from outside. A fault is part of the cache key of the stage it is planted in, so a faulty run never reuses
that stage's healthy result (or the other way round) and every stage downstream reruns on the changed
artifacts. docs/fault-injection.md is the fault suite's table (`make test-faults` writes it).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

ENV = "FT_INJECT_FAULT"

# name -> (the stage it is planted in, what it does, the gate that must catch it)
FAULTS: dict[str, tuple[str, str, str]] = {
    "lr_zero": ("train", "the optimizer's learning rate is 0", "loss_convergence"),
    "frozen_lora": ("train", "LoRA gradients are zeroed before every update", "parameter_updates"),
    "base_weight_trained": (
        "train",
        "the final norm's weight is left trainable and trained",
        "parameter_updates",
    ),
    "mask_prompt_ignored": ("train", "prompt tokens are trained (loss mask all ones)", "label_mask"),
    "adapter_scale_zero": ("train", "the saved adapter_config.json says scale 0", "artifacts"),
    "adapter_truncated": ("train", "the saved adapters.safetensors is cut in half", "artifacts"),
    "disk_full_checkpoint": ("train", "writing the second checkpoint fails with ENOSPC", "(stage error)"),
    "fuse_drops_adapter": ("fuse", "the fused folder is the base model", "fuse_exactness"),
    "fuse_scales_tensor": ("fuse", "the final norm is scaled by 1.02", "fuse_exactness"),
    "gguf_pretokenizer_mislabelled": (
        "gguf",
        "tokenizer.ggml.pre names another pre-tokenizer",
        "gguf_tokenizer",
    ),
    "modelfile_wrong_template": (
        "ollama",
        "the Modelfile TEMPLATE is another chat format's",
        "served_template",
    ),
    "modelfile_no_stop": ("ollama", "the Modelfile has no stop strings", "served_template"),
    "eval_runtime_base": ("evaluate", "the fused-MLX runtime answers with the base model", "output_parity"),
}


# Faults that only make a write fail: what was saved before them is exactly a healthy run's, so a healthy
# rerun may resume from it (a disk that filled up, then freed).
WRITE_ONLY = frozenset({"disk_full_checkpoint"})


def injected(env: Mapping[str, str] | None = None) -> list[str]:
    """The active faults; an unknown name is an error (a typo must not make a fault suite pass)."""
    raw = (os.environ if env is None else env).get(ENV, "")
    names = [n.strip() for n in raw.split(",") if n.strip()]
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        raise ValueError(f"{ENV}: unknown fault(s) {unknown}; known: {', '.join(FAULTS)}")
    return names


def injected_at(stage: str) -> list[str]:
    """The active faults planted in this stage (part of its cache key; downstream stages see their effect
    through the artifacts they read)."""
    return [n for n in injected() if FAULTS[n][0] == stage]


def active(name: str) -> bool:
    if name not in FAULTS:
        raise KeyError(f"no fault named {name!r}")
    return name in injected()
