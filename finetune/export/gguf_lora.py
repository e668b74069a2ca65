"""The trained adapter as a GGUF LoRA for llama.cpp (and Ollama's ADAPTER), by llama.cpp's own converter.

convert_lora_to_gguf.py reads the PEFT export (finetune.export.peft_adapter) and writes adapter.lora.alpha;
llama.cpp applies each LoRA tensor at scale x alpha / r, so the PEFT alpha (mlx-lm's scale x r) carries the
adapter's strength into the GGUF. The base it applies to is the base model's own GGUF (what users ship once).
"""

from __future__ import annotations

import os
import tempfile
from pathlib import Path

from finetune import faults
from finetune.export.converter import fetch_converter
from finetune.export.gguf import GGUFExportError, _overlay, _reason, _run_converter
from finetune.export.gguf_inspect import rewrite_number

ALPHA_KEY = "adapter.lora.alpha"


def export_gguf_lora(
    peft_dir: Path, base_hf_dir: Path, out_path: Path, *, outtype: str = "f32", timeout: float = 600.0
) -> Path:
    """convert_lora_to_gguf.py PEFT_DIR --base BASE -> out_path (atomic); GGUFExportError naming why not."""
    import json

    tree = fetch_converter()
    out_path = Path(out_path).resolve()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent) as tmp:
        base = _overlay(Path(base_hf_dir).resolve(), Path(tmp), fix_gpt2_n_ctx=True, gpt2_output=False)
        tmp_out = Path(tmp) / "adapter.gguf"
        args = [
            "--base",
            str(base),
            "--outfile",
            str(tmp_out),
            "--outtype",
            outtype,
            str(Path(peft_dir).resolve()),
        ]
        proc = _run_converter(tree, args, tmp, timeout, Path(base_hf_dir), script="convert_lora_to_gguf.py")
        if proc.returncode != 0 or not tmp_out.is_file():
            raise GGUFExportError(
                f"convert_lora_to_gguf {peft_dir}: exit code {proc.returncode}{_reason(proc.stderr, proc.stdout)}"
            )
        os.replace(tmp_out, out_path)
    rank = json.loads((Path(peft_dir) / "adapter_config.json").read_text())["r"]
    return faults.point("gguf_lora_alpha_missing", out_path, rewrite_number, rank)
