"""Fault injection: plant a known fault into the real pipeline, to prove the gate meant for it catches it.

    FT_INJECT_FAULT=adapter_scale_zero FT_FAULTS_ARMED=planted-by-the-finetune-test-harness finetune run ...
    (several faults: comma-separated)

Only the test harness arms faults: `arming(*names)` is the environment it sets (tests/conftest.py's
`plant_fault` fixture, the fault, chaos and tier-3 suites). FT_INJECT_FAULT alone, as a shell that exported
it for the fault suite would have it, is refused before any work with a message naming both variables
(exit 2). A run with a fault planted ends `fault_injected` (exit 4), never `passed` or `not_judged`, even
when no gate notices the fault; its gates still say which one caught it.

Product code holds one line per fault, `value = faults.point("name", value, *context)`; every effect (the
code that breaks things) is below. A fault is part of the cache key of the stage it is planted in, so a
faulty run never reuses that stage's healthy result (or the other way round) and every stage downstream
reruns on the changed artifacts. docs/fault-injection.md is the fault suite's table (`make test-faults`).
"""

from __future__ import annotations

import errno
import json
import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from finetune.errors import UserError

ENV = "FT_INJECT_FAULT"
ARM_ENV = "FT_FAULTS_ARMED"
ARM_VALUE = "planted-by-the-finetune-test-harness"  # a phrase nobody exports by accident
STATUS = "fault_injected"  # the status of every run with a fault planted
EXIT_CODE = 4

# name -> (the stage it is planted in, what it does, the gate that must catch it)
FAULTS: dict[str, tuple[str, str, str]] = {
    "split_leak": ("data", "the first validation row is written into train too", "split_overlap"),
    "questions_as_ids": (
        "data",
        "training questions are opaque ids (answers not tied to facts)",
        "heldout_score",
    ),
    "lr_zero": ("train", "the optimizer's learning rate is 0", "loss_convergence"),
    "lr_too_high": ("train", "the optimizer's learning rate is 10x the configured one", "forgetting"),
    "frozen_lora": ("train", "LoRA gradients are zeroed before every update", "parameter_updates"),
    "one_adapter_frozen": (
        "train",
        "one adapted layer's LoRA gradients are zeroed (an adapter that is not wired in)",
        "parameter_updates",
    ),
    "base_weight_trained": ("train", "the final norm's weight is trained too", "parameter_updates"),
    "lora_trains_everything": ("train", "the base under the LoRA layers trains too", "memory_efficiency"),
    "mask_prompt_ignored": ("train", "prompt tokens are trained (loss mask all ones)", "label_mask"),
    "end_marker_untrained": ("train", "the end-of-turn token after each answer has no loss", "label_mask"),
    "adapter_scale_zero": ("train", "the saved adapter_config.json says scale 0", "artifacts"),
    "adapter_truncated": ("train", "the saved adapters.safetensors is cut in half", "artifacts"),
    "disk_full_checkpoint": ("train", "writing the second checkpoint fails with ENOSPC", "(stage error)"),
    "fuse_drops_adapter": ("fuse", "the fused folder is the base model", "fuse_exactness"),
    "fuse_scales_tensor": ("fuse", "the final norm is scaled by 1.02", "fuse_exactness"),
    "fuse_config_drift": ("fuse", "the fused config.json's norm epsilon is 10x the base's", "(stage error)"),
    "gguf_metadata_drift": ("gguf", "the GGUF's norm epsilon is 10x the model's", "(stage error)"),
    "gguf_pretokenizer_mislabelled": (
        "gguf",
        "tokenizer.ggml.pre names another pre-tokenizer",
        "gguf_tokenizer",
    ),
    "modelfile_wrong_template": ("ollama", "the Modelfile TEMPLATE is another format's", "served_template"),
    "modelfile_no_stop": ("ollama", "the Modelfile has no stop strings", "served_template"),
    "modelfile_extra_stop": (
        "ollama",
        "the Modelfile adds a stop string ('User:') that the training template never ends answers with",
        "served_template",
    ),
    "modelfile_short_num_predict": (
        "ollama",
        "the Modelfile's num_predict is half the longest reference answer",
        "served_defaults",
    ),
    "modelfile_no_temperature": (
        "ollama",
        "the Modelfile leaves temperature out (default requests sample at Ollama's 0.8)",
        "served_defaults",
    ),
    "eval_runtime_base": ("evaluate", "the fused-MLX runtime answers with the base model", "output_parity"),
    "peft_alpha_missing": (
        "export",
        "the PEFT adapter_config.json says lora_alpha = r (mlx-lm's scale left out: 1/scale of the adapter)",
        "peft_parity",
    ),
    "gguf_lora_alpha_missing": (
        "export",
        "the GGUF LoRA's adapter.lora.alpha says r (llama.cpp then applies 1/scale of the adapter)",
        "gguf_lora_parity",
    ),
    "adapter_wrong_base": (
        "export",
        "the GGUF LoRA ships with the fine-tuned (fused) model as its base: the adapter applied twice",
        "gguf_lora_parity",
    ),
    "adapters_swapped": (
        "export",
        "two runs shipped on one base: each Modelfile's ADAPTER names the other run's adapter",
        "adapters_separate",
    ),
    "quant_wrong_type": (
        "export",
        "the quantizer is asked for another type than the one shipped under the asked name (q4_0 for q4_K_M)",
        "quant_types",
    ),
    "quant_tensor_damaged": (
        "export",
        "one quantized tensor (a middle block's ffn_down) has its rows shifted by one after quantizing",
        "quant_quality",
    ),
    "quant_of_base": (
        "export",
        "the base model is quantized and shipped under the fine-tune's name, instead of the fused model",
        "quant_answers",
    ),
}


# Faults that only make a write fail: what was saved before them is exactly a healthy run's, so a healthy
# rerun may resume from it (a disk that filled up, then freed).
WRITE_ONLY = frozenset({"disk_full_checkpoint"})


class FaultsNotArmed(UserError):
    """FT_INJECT_FAULT without the harness's arming key: a leaked variable, not a request."""


def arming(*names: str) -> dict[str, str]:
    """The environment that plants these faults, as the test harness sets it (no names: none planted)."""
    return {ENV: ",".join(names), ARM_ENV: ARM_VALUE}


def injected(env: Mapping[str, str] | None = None) -> list[str]:
    """The planted faults. An unknown name is an error (a typo must not make a fault suite pass), and so is
    a fault without the arming key (a shell that kept FT_INJECT_FAULT must not ship a broken adapter)."""
    env = os.environ if env is None else env
    names = [n.strip() for n in env.get(ENV, "").split(",") if n.strip()]
    unknown = [n for n in names if n not in FAULTS]
    if unknown:
        raise UserError(f"{ENV}: unknown fault(s) {unknown}; known: {', '.join(FAULTS)}")
    if names and env.get(ARM_ENV) != ARM_VALUE:
        raise FaultsNotArmed(
            f"{ENV}={','.join(names)} is set but {ARM_ENV} does not arm it: faults are planted only by the "
            f"test harness. Unset {ENV} (a shell that exported it for the fault suite), or arm it as "
            "finetune/faults.py says to break this run on purpose"
        )
    return names


def injected_at(stage: str) -> list[str]:
    """The planted faults of this stage (part of its cache key; downstream stages see their effect
    through the artifacts they read)."""
    return [n for n in injected() if FAULTS[n][0] == stage]


T = TypeVar("T")


def point(name: str, value: T, *context: Any) -> T:
    """A fault's one line in product code: `value` itself, or, with the fault planted, what its effect makes
    of it (`context`: what else the effect needs, e.g. the base model's folder)."""
    if name not in FAULTS:
        raise KeyError(f"no fault named {name!r}")
    return EFFECTS[name](value, *context) if name in injected() else value


# ---------------------------------------------------------------- the effects, one per fault


def _split_leak(rows: list, counts: dict[str, int]) -> list:
    """The last training row replaced by the first validation row: a leak the split counts do not show."""
    n = counts["train"]
    return [*rows[: n - 1], rows[n], *rows[n:]]


def _questions_as_ids(built: Any) -> Any:
    """Each training question becomes an opaque id; a held-out paraphrase follows its row's new name."""
    import dataclasses

    ids = {row["messages"][0]["content"]: f"Recall entry {i:03d}." for i, row in enumerate(built.train)}
    train = [r | {"messages": [r["messages"][0] | {"content": ids[r["messages"][0]["content"]]}, *r["messages"][1:]]}
             for r in built.train]  # fmt: skip
    heldout = [h | {"paraphrase_of": ids.get(h.get("paraphrase_of"), h.get("paraphrase_of"))}
               for h in built.heldout]  # fmt: skip
    return dataclasses.replace(built, train=train, heldout=heldout)


def _frozen_lora(opt):
    import mlx.core as mx
    from mlx.utils import tree_map

    real = opt.apply_gradients
    opt.apply_gradients = lambda grads, params: real(tree_map(mx.zeros_like, grads), params)
    return opt


def _one_adapter_frozen(opt):
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    real = opt.apply_gradients

    def apply(grads, params):
        flat = tree_flatten(grads)
        first = min(k.rsplit(".", 1)[0] for k, _ in flat if k.endswith((".lora_a", ".lora_b")))
        kept = [(k, mx.zeros_like(v) if k.rsplit(".", 1)[0] == first else v) for k, v in flat]
        return real(tree_unflatten(kept), params)

    opt.apply_gradients = apply
    return opt


def _end_marker_untrained(mask: list[int]) -> list[int]:
    """The last token of every trained run (the end-of-turn marker) carries no loss."""
    return [0 if m and (i + 1 == len(mask) or not mask[i + 1]) else m for i, m in enumerate(mask)]


def _base_weight_trained(model, final_norm: Callable):
    _, norm = final_norm(model)  # every architecture has one
    norm.unfreeze(keys=["weight"], recurse=False)
    return model


def _adapter_scale_zero(adapter_dir: Path) -> Path:
    path = adapter_dir / "adapter_config.json"
    cfg = json.loads(path.read_text())
    cfg["lora_parameters"]["scale"] = 0.0
    path.write_text(json.dumps(cfg, indent=2))
    return adapter_dir


def _adapter_truncated(adapter_dir: Path) -> Path:
    path = adapter_dir / "adapters.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return adapter_dir


def _disk_full_checkpoint(target: Path, has_checkpoint: bool) -> Path:
    if has_checkpoint:  # the second write fails: there is a checkpoint to keep intact
        raise OSError(errno.ENOSPC, "No space left on device (injected)", str(target))
    return target


def _fuse_drops_adapter(fused_model, base_path: Path):
    from mlx_lm.utils import load

    return load(str(base_path))[0]


def _fuse_scales_tensor(model, final_norm: Callable):
    _, norm = final_norm(model)
    norm.weight = norm.weight * 1.02
    return model


def _gguf_pretokenizer_mislabelled(path: Path, rewrite_string: Callable) -> Path:
    current = rewrite_string(path, "tokenizer.ggml.pre", None)
    rewrite_string(path, "tokenizer.ggml.pre", "llama-bpe" if current != "llama-bpe" else "gpt-2")
    return path


# HF config keys of the norm epsilon (Llama style, GPT-2 style), at the top or in a multimodal text_config
EPSILON_KEYS = ("rms_norm_eps", "layer_norm_epsilon", "layer_norm_eps")


def _fuse_config_drift(config: dict) -> dict:
    for part in (config, config.get("text_config") or {}):
        if key := next((k for k in EPSILON_KEYS if isinstance(part.get(k), float)), None):
            part[key] *= 10
            return config
    raise KeyError("no norm epsilon in config.json to plant fuse_config_drift on")


def _gguf_metadata_drift(path: Path, inspect_gguf: Callable, rewrite_number: Callable) -> Path:
    info = inspect_gguf(path)
    for suffix in ("attention.layer_norm_rms_epsilon", "attention.layer_norm_epsilon"):
        if (old := info.metadata.get(f"{info.architecture}.{suffix}")) is not None:
            rewrite_number(path, f"{info.architecture}.{suffix}", old * 10)
            return path
    raise KeyError(f"{path}: no norm epsilon to plant gguf_metadata_drift on")


def _modelfile_wrong_template(template: str, chat_format: Callable) -> str:
    return chat_format("llama3" if "<|im_start|>" in template else "chatml").template


def _gguf_lora_alpha_missing(path: Path, rewrite_number: Callable, rank: int) -> Path:
    rewrite_number(path, "adapter.lora.alpha", float(rank))
    return path


def _quant_tensor_damaged(path: Path) -> Path:
    """Same type, same size, wrong values: what only a quality measurement can see."""
    import gguf
    import numpy as np

    reader = gguf.GGUFReader(path, "r+")
    blocks = sorted({int(t.name.split(".")[1]) for t in reader.tensors if t.name.startswith("blk.")})
    name = f"blk.{blocks[len(blocks) // 2]}.ffn_down.weight"
    tensor = next(t for t in reader.tensors if t.name == name)
    tensor.data[...] = np.roll(np.array(tensor.data), 1, axis=0)
    reader.data.flush()
    return path


EFFECTS: dict[str, Callable[..., Any]] = {
    "split_leak": _split_leak,
    "questions_as_ids": _questions_as_ids,
    "lr_zero": lambda lr: 0.0,
    "lr_too_high": lambda lr: (lambda step: 10 * lr(step)) if callable(lr) else 10 * lr,
    "frozen_lora": _frozen_lora,
    "one_adapter_frozen": _one_adapter_frozen,
    "base_weight_trained": _base_weight_trained,
    "lora_trains_everything": lambda model: model.unfreeze(),  # returns the module
    "mask_prompt_ignored": lambda mask: [1] * len(mask),
    "end_marker_untrained": _end_marker_untrained,
    "adapter_scale_zero": _adapter_scale_zero,
    "adapter_truncated": _adapter_truncated,
    "disk_full_checkpoint": _disk_full_checkpoint,
    "fuse_drops_adapter": _fuse_drops_adapter,
    "fuse_scales_tensor": _fuse_scales_tensor,
    "fuse_config_drift": _fuse_config_drift,
    "gguf_metadata_drift": _gguf_metadata_drift,
    "gguf_pretokenizer_mislabelled": _gguf_pretokenizer_mislabelled,
    "modelfile_wrong_template": _modelfile_wrong_template,
    "modelfile_no_stop": lambda stops: [],
    "modelfile_extra_stop": lambda stops: [*stops, "User:"],
    "modelfile_short_num_predict": lambda params, longest: {**params, "num_predict": max(1, longest // 2)},
    "modelfile_no_temperature": lambda params: {k: v for k, v in params.items() if k != "temperature"},
    "eval_runtime_base": lambda fused_dir, base_dir: base_dir,
    "peft_alpha_missing": lambda alpha, rank: float(rank),
    "gguf_lora_alpha_missing": _gguf_lora_alpha_missing,
    "adapter_wrong_base": lambda base, fused: fused(),
    "adapters_swapped": lambda loras: loras[1:] + loras[:1],
    "quant_wrong_type": lambda qtype: "q4_0" if qtype != "q4_0" else "q8_0",
    "quant_tensor_damaged": _quant_tensor_damaged,
    "quant_of_base": lambda fused_gguf, base_gguf: base_gguf(),
}
