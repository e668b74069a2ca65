"""finetune.models.safetensors: headers and float32 tensors read by hand; damaged files are named."""

import json
import struct

import numpy as np
import pytest
from safetensors.numpy import save_file

from finetune.models.safetensors import SafetensorsError, dtype_counts, load_file, load_folder, read_header


@pytest.fixture
def weights(tmp_path):
    rng = np.random.default_rng(0)
    tensors = {
        "a.weight": rng.standard_normal((3, 4)).astype(np.float32),
        "b.bias": rng.standard_normal(5).astype(np.float16),
        "c.scalar": np.array(2.5, dtype=np.float64),
    }
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path), metadata={"format": "pt"})
    return path, tensors


def bf16_file(path, values: np.ndarray):
    """A hand-written BF16 safetensors file (numpy has no bfloat16): the top 16 bits of each float32."""
    raw = (values.astype(np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
    header = json.dumps({"w": {"dtype": "BF16", "shape": list(values.shape), "data_offsets": [0, len(raw)]}})
    path.write_bytes(struct.pack("<Q", len(header)) + header.encode() + raw)
    return path


def test_header_lists_names_dtypes_shapes(weights):
    path, tensors = weights
    header = read_header(path)
    assert header["__metadata__"] == {"format": "pt"}
    assert {k: (v["dtype"], v["shape"]) for k, v in header.items() if k != "__metadata__"} == {
        "a.weight": ("F32", [3, 4]),
        "b.bias": ("F16", [5]),
        "c.scalar": ("F64", []),
    }


def test_load_file_widens_every_float_to_float32_exactly(weights, tmp_path):
    path, tensors = weights
    got = load_file(path)
    assert set(got) == set(tensors)
    for name, value in tensors.items():
        assert got[name].dtype == np.float32 and got[name].shape == value.shape
        np.testing.assert_array_equal(got[name], value.astype(np.float32))
    exact = np.array([[1.0, -2.5], [0.15625, 2.0**100]], dtype=np.float32)  # representable in bfloat16
    assert np.array_equal(load_file(bf16_file(tmp_path / "bf.safetensors", exact))["w"], exact)


def test_truncated_file_is_named(weights):
    path, _ = weights
    data = path.read_bytes()
    path.write_bytes(data[: len(data) - 10])  # the header is whole, the tensor data is not
    with pytest.raises(
        SafetensorsError,
        match=rf"^{path}: {len(data) - 10} bytes, but its header needs {len(data)}: truncated",
    ):
        read_header(path)
    path.write_bytes(data[:100])  # cut inside the header
    with pytest.raises(
        SafetensorsError, match=rf"^{path}: header length \d+ exceeds the file \(100 bytes\): truncated"
    ):
        read_header(path)
    path.write_bytes(data[:5])
    with pytest.raises(SafetensorsError, match=rf"^{path}: truncated \(5 bytes\): not a safetensors file"):
        load_file(path)


def test_garbage_and_missing_files_are_named(tmp_path):
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(struct.pack("<Q", 4) + b"{no}")
    with pytest.raises(SafetensorsError, match=rf"^{junk}: unreadable safetensors header"):
        read_header(junk)
    with pytest.raises(SafetensorsError, match="missing.safetensors: unreadable safetensors header"):
        read_header(tmp_path / "missing.safetensors")
    assert issubclass(SafetensorsError, ValueError)


def test_quantized_tensors_are_refused(tmp_path):
    path = tmp_path / "q.safetensors"
    save_file({"q": np.arange(8, dtype=np.int8)}, str(path))
    assert read_header(path)["q"]["dtype"] == "I8"
    with pytest.raises(
        SafetensorsError, match=rf"{path}: tensor q has dtype I8 \(quantized\?\), not a float"
    ):
        load_file(path)


def test_folders(weights, tmp_path):
    path, tensors = weights
    save_file({"d.weight": np.ones((2, 2), np.float32)}, str(tmp_path / "model-2.safetensors"))
    (tmp_path / "notes.txt").write_text("not weights")
    assert dtype_counts(tmp_path) == {"F32": 2, "F16": 1, "F64": 1}
    assert sorted(load_folder(tmp_path)) == ["a.weight", "b.bias", "c.scalar", "d.weight"]
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(SafetensorsError, match=rf"{empty}: no \*.safetensors weights"):
        load_folder(empty)
    assert dtype_counts(empty) == {}
