"""check_quant_types on GGUFs written here with gguf-py's own quantizer: what a q8_0 file must hold."""

from __future__ import annotations

import gguf
import numpy as np
import pytest

from finetune.export.quant_types import TYPES, check_quant_types

QT = gguf.GGMLQuantizationType
RNG = np.random.default_rng(0)
WEIGHTS = {"token_embd.weight": (96, 64), "blk.0.ffn_down.weight": (64, 128), "blk.0.attn_q.weight": (64, 64)}


def write(path, file_type, kind=QT.F16, drop=(), extra_1d_type=QT.F32):
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_file_type(file_type)
    for name, shape in WEIGHTS.items():
        if name in drop:
            continue
        data = RNG.standard_normal(shape).astype(np.float32)
        if kind == QT.F16:
            w.add_tensor(name, data.astype(np.float16))
        else:
            w.add_tensor(name, gguf.quants.quantize(data, kind), raw_dtype=kind)
    w.add_tensor("blk.0.attn_norm.weight", np.ones(64, np.float32), raw_dtype=extra_1d_type)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


@pytest.fixture
def reference(tmp_path):
    return write(tmp_path / "f16.gguf", 1)


def test_a_q8_0_file_as_llama_cpp_writes_it_passes(tmp_path, reference):
    assert check_quant_types(write(tmp_path / "q.gguf", 7, QT.Q8_0), "q8_0", reference) == []


def test_another_type_under_the_asked_name_is_named(tmp_path, reference):
    problems = check_quant_types(write(tmp_path / "q.gguf", 2, QT.Q4_0), "q8_0", reference)
    assert problems[0] == "general.file_type is 2, not 7 (q8_0)"
    assert any(p.startswith("3 tensor(s) are Q4_0, which q8_0 never writes") for p in problems)
    assert problems[-1] == "no tensor is Q8_0: this is not a q8_0 file"


def test_an_unquantized_file_is_not_a_quantized_one(reference):
    problems = check_quant_types(reference, "q4_K_M", reference)
    assert any("are F16, which q4_K_M never writes" in p for p in problems)


def test_a_missing_tensor_is_named(tmp_path, reference):
    problems = check_quant_types(write(tmp_path / "q.gguf", 7, QT.Q8_0, drop=("blk.0.attn_q.weight",)), "q8_0",
                                 reference)  # fmt: skip
    assert problems == ["1 tensor(s) missing: blk.0.attn_q.weight"]


def test_every_type_names_llama_cpp_file_type_and_its_main_weights_are_allowed():
    assert len({t.file_type for t in TYPES.values()}) == len(TYPES)
    assert all(t.main <= t.allowed for t in TYPES.values())


def test_the_config_offers_exactly_the_types_this_module_checks():
    from typing import get_args

    from finetune.config.schema import QuantType

    assert set(get_args(QuantType)) == set(TYPES)
