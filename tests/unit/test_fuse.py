"""Fusing LoRA/DoRA adapters: the fused model must compute what base + adapter computes, in full precision."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from finetune.fuse import FuseError, fuse, read_adapter_config
from finetune.gguf_export import export_gguf
from finetune.gguf_inspect import check_gguf
from finetune.gguf_tokenizer import build_tokenizer_spec

LORA = {"rank": 4, "dropout": 0.0, "scale": 2.0}
IDS = [19556, 905, 216, 1, 4093, 198, 33, 34, 35, 2]


def make_adapter(base: Path, out: Path, *, kind: str = "lora", seed: int = 0) -> Path:
    """An adapter as mlx-lm's trainer leaves it, with lora_b moved off zero (as after some training steps)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.tuner.utils import linear_to_lora_layers
    from mlx_lm.utils import load_model

    model, _ = load_model(base)  # model only: loading the tokenizer costs ~1 s each time
    model.freeze()
    linear_to_lora_layers(model, 2, LORA, use_dora=kind == "dora")
    rng = np.random.default_rng(seed)
    params = dict(tree_flatten(model.trainable_parameters()))
    params |= {
        k: mx.array(rng.normal(0, 0.05, v.shape).astype(np.float32))
        for k, v in params.items()
        if "lora_b" in k
    }
    out.mkdir(parents=True)
    mx.save_safetensors(str(out / "adapters.safetensors"), params)
    cfg = {"fine_tune_type": kind, "num_layers": 2, "lora_parameters": LORA}
    (out / "adapter_config.json").write_text(json.dumps(cfg))
    return out


def logits(path: Path, adapter: Path | None = None) -> np.ndarray:
    import mlx.core as mx
    from mlx_lm.tuner.utils import load_adapters
    from mlx_lm.utils import load_model

    model, _ = load_model(path)
    if adapter is not None:
        load_adapters(model, str(adapter))
    return np.array(model(mx.array([IDS]))[0].astype(mx.float32))


# --------------------------------------------------------------------------- adapter validation


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "adapters.safetensors: not found"),
        (
            {"adapters.safetensors": b"", "adapter_config.json": b'{"num_layers": 2,\n "x": }'},
            r"json:2: invalid JSON",
        ),
        (
            {
                "adapters.safetensors": b"",
                "adapter_config.json": b'{"fine_tune_type": "qlora", "num_layers": 2}',
            },
            "qlora",
        ),
        (
            {"adapters.safetensors": b"", "adapter_config.json": b'{"num_layers": "all"}'},
            "num_layers must be an integer",
        ),
        (
            {
                "adapters.safetensors": b"",
                "adapter_config.json": b'{"num_layers": 2, "lora_parameters": {"rank": 8}}',
            },
            "missing dropout, scale",
        ),
    ],
)
def test_read_adapter_config_explains_what_is_wrong(tmp_path, files, message):
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    with pytest.raises(FuseError, match=message):
        read_adapter_config(tmp_path)


def test_read_adapter_config_accepts_what_mlx_lm_writes(tmp_path):
    (tmp_path / "adapters.safetensors").write_bytes(b"")
    (tmp_path / "adapter_config.json").write_text(
        json.dumps({"fine_tune_type": "lora", "num_layers": 4, "lora_parameters": LORA})
    )
    assert read_adapter_config(tmp_path)["num_layers"] == 4


# --------------------------------------------------------------------------- fusing


@pytest.mark.parametrize("kind", ["lora", "dora"])
def test_fused_model_computes_base_plus_adapter(tiny_hf, tmp_path, kind):
    adapter = make_adapter(tiny_hf, tmp_path / "adapter", kind=kind)
    out = fuse(tiny_hf, adapter, tmp_path / "fused")

    with_adapter, fused, base = logits(tiny_hf, adapter), logits(out), logits(tiny_hf)
    assert np.abs(fused - with_adapter).max() < 1e-4
    assert np.abs(fused - base).max() > 1e-2  # a fuse that dropped the adapter would equal the base
    import mlx.core as mx

    weights = mx.load(str(out / "model.safetensors"))
    assert not [k for k in weights if "lora" in k or k.endswith(".m")]
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == mx.float32
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= {p.name for p in out.iterdir()}


def test_fuse_dequantizes_a_quantized_base(tiny_hf, tmp_path):
    import mlx.core as mx
    from mlx_lm.utils import load, quantize_model, save

    model, tok, config = load(str(tiny_hf), return_config=True)
    model, config = quantize_model(model, config, group_size=64, bits=8)
    save(tmp_path / "q8", str(tiny_hf), model, tok, config)
    adapter = make_adapter(tmp_path / "q8", tmp_path / "adapter")

    out = fuse(tmp_path / "q8", adapter, tmp_path / "fused")
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization" not in cfg and "quantization_config" not in cfg
    weights = mx.load(str(out / "model.safetensors"))
    assert not [k for k in weights if k.endswith(".scales")]
    assert weights["model.layers.1.mlp.down_proj.weight"].dtype == mx.float32
    assert np.abs(logits(out) - logits(tmp_path / "q8", adapter)).max() < 1e-3


def test_fused_folder_exports_to_a_clean_gguf(tiny_hf, tmp_path):
    out = fuse(tiny_hf, make_adapter(tiny_hf, tmp_path / "adapter"), tmp_path / "fused")
    spec = build_tokenizer_spec(out)
    gguf = export_gguf(out, tmp_path / "fused.gguf", tokenizer_spec=spec)
    assert check_gguf(gguf, out, spec=spec) == []


def test_fuse_failure_leaves_no_output(tiny_hf, tmp_path):
    adapter = make_adapter(tiny_hf, tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(cfg | {"lora_parameters": LORA | {"rank": 8}}))
    with pytest.raises(ValueError):  # mlx-lm refuses adapter weights whose shapes do not match
        fuse(tiny_hf, adapter, tmp_path / "fused")
    assert not (tmp_path / "fused").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
