"""GGUF export through llama.cpp's own converter: any architecture it knows, GPT-2's two fixes, clear errors."""

from __future__ import annotations

import json
import shutil

import pytest

from finetune.export.gguf import GGUFExportError, convert_hf_to_gguf
from finetune.export.gguf_inspect import check_gguf, inspect_gguf


@pytest.fixture(scope="module")
def tiny_gpt2():
    from finetune.models.cache import cache_root
    from finetune.models.tiny import build_tiny_gpt2

    return build_tiny_gpt2(cache_root() / "models")


def test_gpt2_gets_its_context_length_and_an_output_tensor_ollama_054_needs(tiny_gpt2, tmp_path):
    gguf = convert_hf_to_gguf(tiny_gpt2, tmp_path / "g.gguf", "f16")
    info = inspect_gguf(gguf)
    assert info.architecture == "gpt2" and info.tokenizer_pre == "gpt-2" and len(info.tokens) == 50257
    assert info.metadata["gpt2.context_length"] == 1024
    assert "output.weight" in {t.name for t in info.tensors}
    assert check_gguf(gguf, tiny_gpt2) == []
    assert not any(p.name.endswith("lm_head.safetensors") for p in tiny_gpt2.iterdir()), (
        "the input stays untouched"
    )


def test_a_gpt2_folder_in_mlx_lms_layout_is_refused_naming_the_fix(tiny_gpt2, tmp_path):
    import mlx.core as mx

    bad = tmp_path / "mlx-layout"
    shutil.copytree(tiny_gpt2, bad)
    weights = mx.load(str(bad / "model.safetensors"))
    mx.save_safetensors(str(bad / "model.safetensors"), {f"model.{k}": v for k, v in weights.items()})
    with pytest.raises(GGUFExportError, match="to_base_layout"):
        convert_hf_to_gguf(bad, tmp_path / "x.gguf")
    assert not (tmp_path / "x.gguf").exists()


def test_an_architecture_the_converter_does_not_know_fails_with_its_reason(tiny_hf, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(tiny_hf, odd)
    cfg = json.loads((odd / "config.json").read_text())
    (odd / "config.json").write_text(json.dumps(cfg | {"architectures": ["NoSuchModelForCausalLM"]}))
    with pytest.raises(GGUFExportError, match="NoSuchModelForCausalLM"):
        convert_hf_to_gguf(odd, tmp_path / "odd.gguf")
    assert list(tmp_path.glob("*.gguf")) == []


def test_the_pretokenizer_fault_mislabels_the_file(tiny_hf, tmp_path, plant_fault):
    plant_fault("gguf_pretokenizer_mislabelled")
    gguf = convert_hf_to_gguf(tiny_hf, tmp_path / "m.gguf", "f16")
    assert inspect_gguf(gguf).tokenizer_pre == "llama-bpe"  # SmolLM2's tokenizer is "smollm"


def test_the_metadata_fault_changes_the_norm_epsilon_and_check_gguf_names_it(tiny_hf, tmp_path, plant_fault):
    plant_fault("gguf_metadata_drift")
    gguf = convert_hf_to_gguf(tiny_hf, tmp_path / "m.gguf", "f16")
    eps = json.loads((tiny_hf / "config.json").read_text())["rms_norm_eps"]
    assert inspect_gguf(gguf).metadata["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(10 * eps)
    assert check_gguf(gguf, tiny_hf) == [
        f"m.gguf: llama.attention.layer_norm_rms_epsilon is "
        f"{inspect_gguf(gguf).metadata['llama.attention.layer_norm_rms_epsilon']}, HF config says {eps}"
    ]
