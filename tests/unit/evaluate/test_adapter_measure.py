"""finetune.evaluate.adapter_measure: transformers + peft vs MLX on the tiny Llama, with its own floor."""

from __future__ import annotations

import json
import warnings

from finetune.evaluate.adapter_measure import measure_peft
from finetune.export.peft_adapter import PEFT_CONFIG, export_peft
from tests.unit.export.conftest import IDS, build_adapter


def test_transformers_and_peft_compute_what_mlx_computes_and_a_weaker_alpha_does_not(tiny_hf, tmp_path):
    # the last of 2 blocks only: PEFT must be told, or it adds zero LoRA layers to block 0 and warns
    tiny_adapter = build_adapter(tiny_hf, tmp_path / "adapter", layers=1)
    out = tmp_path / "peft"
    assert export_peft(tiny_adapter, tiny_hf, out)["layers_to_transform"] == [1]
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        m = measure_peft(tiny_hf, tiny_adapter, out, [IDS, IDS[::-1]])
    assert not [w for w in caught if "missing adapter keys" in str(w.message)], "PEFT loaded every key"
    assert m.positions == 2 * len(IDS) and m.gap <= 10 * m.floor < m.effect
    config = json.loads((out / PEFT_CONFIG).read_text())
    (out / PEFT_CONFIG).write_text(
        json.dumps(config | {"lora_alpha": config["r"]})
    )  # the mlx-lm scale left out
    weak = measure_peft(tiny_hf, tiny_adapter, out, [IDS, IDS[::-1]])
    assert weak.gap > 100 * weak.floor and (weak.floor, weak.effect) == (m.floor, m.effect)


def test_llama_cpp_with_the_gguf_lora_computes_what_mlx_computes(tiny_hf, tmp_path):
    from finetune.evaluate.adapter_measure import measure_gguf_lora
    from finetune.export.gguf import convert_hf_to_gguf
    from finetune.export.gguf_inspect import rewrite_number
    from finetune.export.gguf_lora import ALPHA_KEY, export_gguf_lora

    adapter = build_adapter(tiny_hf, tmp_path / "adapter")
    export_peft(adapter, tiny_hf, tmp_path / "peft")
    lora = export_gguf_lora(tmp_path / "peft", tiny_hf, tmp_path / "adapter.gguf")
    base = convert_hf_to_gguf(tiny_hf, tmp_path / "base.gguf", "f32")
    m = measure_gguf_lora(tiny_hf, adapter, base, lora, [IDS])
    assert m.gap <= 10 * m.floor < m.effect, m
    rewrite_number(lora, ALPHA_KEY, 4.0)  # alpha = r: llama.cpp applies 1/scale of the adapter
    weak = measure_gguf_lora(tiny_hf, adapter, base, lora, [IDS])
    assert weak.gap > 10 * weak.floor, weak
