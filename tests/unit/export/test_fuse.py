"""Fusing LoRA/DoRA adapters: the fused model must compute what base + adapter computes, in full precision."""

from __future__ import annotations

import json

import pytest

from finetune.errors import UserError
from finetune.export.fuse import FuseError, fuse, read_adapter_config
from finetune.export.gguf import convert_hf_to_gguf
from finetune.export.gguf_inspect import check_gguf
from tests import noise

# A fused weight is W + s·(AB)ᵀ rounded once to float32, so its logits differ from x·W + s·(x·A)·B by a
# reassociation: k = 8 x the adapter path's own float32 rounding (its float64 twin), a dropped or doubled delta
# is >= 1e-2 (asserted below).
K_FUSED = 8

LORA = {"rank": 4, "dropout": 0.0, "scale": 2.0}

# --------------------------------------------------------------------------- adapter validation


@pytest.mark.parametrize(
    ("files", "message"),
    [
        ({}, "adapters.safetensors: not found"),
        ({"adapters.safetensors": b""}, "adapter_config.json: not found"),
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
            {"adapters.safetensors": b"", "adapter_config.json": b'{"num_layers": 2, "lora_parameters": 8}'},
            "lora_parameters must be an object",
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


def test_a_full_fine_tune_needs_no_lora_parameters(tmp_path):
    (tmp_path / "adapters.safetensors").write_bytes(b"")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "full", "num_layers": 2}))
    assert read_adapter_config(tmp_path)["fine_tune_type"] == "full"


def test_fuse_errors_are_user_errors_naming_the_problem(tmp_path, tiny_adapter):
    assert issubclass(FuseError, UserError)
    with pytest.raises(FuseError, match="not an HF model folder"):
        fuse(tmp_path / "no-model", tiny_adapter, tmp_path / "out")
    with pytest.raises(FuseError, match="dtype 'int8'"):
        fuse(tmp_path, tiny_adapter, tmp_path / "out", dtype="int8")
    assert not (tmp_path / "out").exists()


# --------------------------------------------------------------------------- fusing


@pytest.fixture(scope="module")
def fused_lora(tiny_hf, tiny_adapter, tmp_path_factory):
    return fuse(tiny_hf, tiny_adapter, tmp_path_factory.mktemp("fused") / "fused")


def _assert_fused(out, base, adapter, model_logits):
    import mlx.core as mx

    with_adapter, fused, plain = model_logits(base, adapter), model_logits(out), model_logits(base)
    floor = noise.rel_max(with_adapter, model_logits(base, adapter, f64=True))
    noise.within(
        f"fused {out.name} logits vs base + adapter", noise.rel_max(fused, with_adapter), floor, K_FUSED
    )
    assert noise.rel_max(fused, plain) > 1e-2  # a fuse that dropped the adapter would equal the base
    weights = mx.load(str(out / "model.safetensors"))
    assert not [k for k in weights if "lora" in k or k.endswith(".m")]
    assert weights["model.layers.0.self_attn.q_proj.weight"].dtype == mx.float32
    assert {"tokenizer.json", "tokenizer_config.json", "config.json"} <= {p.name for p in out.iterdir()}


def test_fused_lora_model_computes_base_plus_adapter(tiny_hf, tiny_adapter, fused_lora, model_logits):
    _assert_fused(fused_lora, tiny_hf, tiny_adapter, model_logits)


def test_fused_dora_model_computes_base_plus_adapter(tiny_hf, tmp_path, make_adapter, model_logits):
    adapter = make_adapter(tiny_hf, tmp_path / "adapter", kind="dora")
    _assert_fused(fuse(tiny_hf, adapter, tmp_path / "fused"), tiny_hf, adapter, model_logits)


def test_fuse_dequantizes_a_quantized_base(tiny_hf, tmp_path, make_adapter, model_logits):
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
    fused = model_logits(out)
    floor = noise.rel_max(fused, model_logits(out, f64=True))  # MLX has no float64 quantized matmul
    noise.within(
        "fused q8 base vs q8 + adapter",
        noise.rel_max(fused, model_logits(tmp_path / "q8", adapter)),
        floor,
        K_FUSED,
    )


def test_fuse_casts_to_the_requested_dtype_replacing_an_old_output(tiny_hf, tiny_adapter, tmp_path):
    import mlx.core as mx

    out = tmp_path / "fused"
    out.mkdir()
    (out / "stale.txt").write_text("from an earlier fuse")
    fuse(tiny_hf, tiny_adapter, out, dtype="bfloat16")
    assert not (out / "stale.txt").exists()
    weights = mx.load(str(out / "model.safetensors"))
    assert {w.dtype for w in weights.values()} == {mx.bfloat16}
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["torch_dtype"] == cfg["dtype"] == "bfloat16"


def test_fused_folder_exports_to_a_clean_gguf(fused_lora, tmp_path):
    gguf = convert_hf_to_gguf(fused_lora, tmp_path / "fused.gguf", "f16")
    assert check_gguf(gguf, fused_lora) == []


def test_fuse_failure_leaves_no_output(tiny_hf, tmp_path, make_adapter):
    adapter = make_adapter(tiny_hf, tmp_path / "adapter")
    cfg = json.loads((adapter / "adapter_config.json").read_text())
    (adapter / "adapter_config.json").write_text(json.dumps(cfg | {"lora_parameters": LORA | {"rank": 8}}))
    with pytest.raises(ValueError):  # mlx-lm refuses adapter weights whose shapes do not match
        fuse(tiny_hf, adapter, tmp_path / "fused")
    assert not (tmp_path / "fused").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adapter"]
