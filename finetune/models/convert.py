"""Convert a packaged GGUF into a Hugging Face folder mlx_lm can load, and fix up its tokenizer files."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.errors import UserError
from finetune.system.atomic import atomic_write_text

# A model folder's files that its GGUF export uses in place of the folder's own (Gemma's tokenizer config);
# fuse copies the folder along, so a fused model exports like its base.
EXPORT_OVERRIDES = "finetune_export"


class ConversionError(UserError):
    """A GGUF cannot be turned into an HF folder here (missing packages, an unexpected tokenizer)."""


def convert_gguf(gguf: Path, out: Path, *, dtype: str = "float32") -> None:
    """SmolLM2's GGUF -> HF folder: weights, then its ChatML tokenizer with the digit split put back."""
    dequantize_gguf(gguf, out, dtype=dtype)
    save_tokenizer(gguf, out)
    fix_config_for_mlx(out / "config.json")


def dequantize_gguf(gguf: Path, out: Path, *, dtype: str = "float32") -> None:
    """Dequantize a GGUF's weights into an HF folder with transformers (needs torch, gguf, accelerate)."""
    try:
        import torch
        from transformers import AutoModelForCausalLM
        from transformers.utils import logging as hf_logging
    except ImportError as exc:
        raise ConversionError(f"converting {gguf.name} needs torch + transformers: {exc}") from exc
    hf_logging.disable_progress_bar()  # drops 2 of 3 bars; the GGUF dequantize bar ignores this switch
    model = AutoModelForCausalLM.from_pretrained(
        gguf.parent, gguf_file=gguf.name, dtype=getattr(torch, dtype)
    )
    # save_pretrained refuses a GGUF-quantized model; the weights in memory are already dequantized.
    model.hf_quantizer = None
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(out)
    del model


def fix_config_for_mlx(config_file: Path) -> None:
    """Copy rope_theta to the top level, where mlx_lm reads it (see rope_problem)."""
    config = json.loads(config_file.read_text())
    rope = config.get("rope_parameters") or {}
    if "rope_theta" not in config and "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    write_json(config_file, config)


def save_tokenizer(gguf: Path, out: Path) -> None:
    """Write SmolLM2's GGUF tokenizer as HF files (tokenizer metadata only, ~1-5 s), checked to be ChatML,
    with its digit split put back."""
    from transformers.tokenization_utils_tokenizers import TokenizersBackend

    tokenizer = TokenizersBackend.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    tokenizer.save_pretrained(str(out))
    fix_tokenizer_config(out)
    add_digit_split(out / "tokenizer.json")


DIGIT_SPLIT = {"type": "Digits", "individual_digits": True}


def add_digit_split(tokenizer_json: Path) -> None:
    """Put back SmolLM2's Digits pre-tokenizer step, which transformers' GGUF loader drops.

    Without it " ½" merges unlike llama.cpp's "smollm" pre-tokenizer (and unlike the original HF tokenizer),
    so the GGUF's tokenization would differ from the one the model was trained with.
    """
    tj = json.loads(tokenizer_json.read_text(encoding="utf-8"))
    pre = tj.get("pre_tokenizer") or {}
    steps = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else [pre] if pre else []
    if DIGIT_SPLIT not in steps:
        tj["pre_tokenizer"] = {"type": "Sequence", "pretokenizers": [DIGIT_SPLIT, *steps]}
        write_json(tokenizer_json, tj)


def fix_tokenizer_config(folder: Path) -> None:
    """tokenizer_config.json must itself carry the ChatML template and eos <|im_end|> (GGUF exporters read it)."""
    file = folder / "tokenizer_config.json"
    config = json.loads(file.read_text())
    jinja = folder / "chat_template.jinja"
    if "chat_template" not in config and jinja.is_file():
        config["chat_template"] = jinja.read_text()
    for key in ("is_local", "local_files_only"):  # machine-specific noise from the load
        config.pop(key, None)
    if "<|im_start|>" not in config.get("chat_template", ""):
        raise ConversionError(f"{file}: no ChatML chat_template after conversion")
    if config.get("eos_token") != "<|im_end|>":
        raise ConversionError(f"{file}: eos_token is {config.get('eos_token')!r}, expected '<|im_end|>'")
    write_json(file, config)


def write_json(file: Path, data: dict) -> None:
    atomic_write_text(file, json.dumps(data, indent=2, ensure_ascii=False) + "\n")
