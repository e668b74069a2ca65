"""The fused folder in the base model's own Hugging Face layout: same tensor names and shapes.

mlx-lm saves a model's parameters as MLX holds them. For most architectures that is the HF layout, but for
GPT-2 mlx-lm's sanitize renames `h.N...` to `model.h.N...` and transposes the four Conv1D weights (HF keeps
them (in, out), nn.Linear (out, in)): llama.cpp's converter then refuses the folder ("Can not map tensor
'model.h.0.attn.c_attn.bias'"), and a square c_proj would even convert silently wrong. to_base_layout()
rewrites such a folder back, and same_layout() is the guard every fuse passes.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

from finetune.models.safetensors import read_header
from finetune.system.atomic import atomic_write_text

GPT2_CONV1D = re.compile(r"^h\.\d+\.(attn\.c_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")


def tensor_shapes(folder: Path) -> dict[str, tuple[int, ...]]:
    out: dict[str, tuple[int, ...]] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        out.update({k: tuple(v["shape"]) for k, v in read_header(file).items() if k != "__metadata__"})
    return out


def same_layout(base: Path, fused: Path) -> list[str]:
    """Differences in tensor names and shapes between two HF folders (empty = the same layout)."""
    a, b = tensor_shapes(base), tensor_shapes(fused)
    # a quantized base (packed weights + scales/biases) fuses to full precision: compare names, not packing
    packed = {k.removesuffix(".scales") for k in a if k.endswith(".scales")}
    quantization = {k for k in a if k.endswith((".scales", ".biases")) and k.rsplit(".", 1)[0] in packed}
    a = {k: v for k, v in a.items() if k not in quantization}
    missing = [f"{k} missing" for k in sorted(set(a) - set(b))]
    extra = [f"{k} extra" for k in sorted(set(b) - set(a))]
    reshaped = [
        f"{k}: {a[k]} in the base, {b[k]} fused"
        for k in sorted(set(a) & set(b))
        if a[k] != b[k] and k.removesuffix(".weight") not in packed
    ]
    return missing + extra + reshaped


def to_base_layout(fused: Path, base: Path) -> bool:
    """Rewrite an mlx-lm-saved GPT-2 folder in the base's HF layout (and its n_ctx); False when not needed."""
    import mlx.core as mx  # reads and writes bf16 too, unlike safetensors.numpy

    cfg_path = fused / "config.json"
    cfg = json.loads(cfg_path.read_text())
    if cfg.get("model_type") != "gpt2":
        return False
    files = sorted(fused.glob("*.safetensors"))
    weights: dict = {}
    for file in files:
        weights.update(mx.load(str(file)))
    if not any(k.startswith("model.") for k in weights):
        return False
    base_names = set(tensor_shapes(base))
    prefix = "transformer." if any(k.startswith("transformer.") for k in base_names) else ""
    out = {}
    for key, value in weights.items():
        name = key.removeprefix("model.")
        out[prefix + name] = value.T if GPT2_CONV1D.match(name) else value  # nn.Linear (out, in) -> Conv1D
    out = {
        k: v for k, v in out.items() if k in base_names or not k.endswith((".attn.bias", ".attn.masked_bias"))
    }
    staging = fused / ".layout"
    staging.mkdir(exist_ok=True)
    arrays = {k: mx.contiguous(v) for k, v in out.items()}
    mx.save_safetensors(str(staging / "model.safetensors"), arrays, metadata={"format": "pt"})
    for file in files:
        file.unlink()
    (fused / "model.safetensors.index.json").unlink(missing_ok=True)
    (staging / "model.safetensors").rename(fused / "model.safetensors")
    staging.rmdir()
    if "n_ctx" not in cfg:
        cfg["n_ctx"] = cfg.get("n_positions", 1024)
        atomic_write_text(cfg_path, json.dumps(cfg, indent=2) + "\n")
    return True
