"""The one safetensors reader: headers (names, dtypes, shapes) and float32 tensors, without torch or MLX.

Parsed by hand because numpy has no bfloat16; a truncated or corrupt file is an error naming the file.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path

import numpy as np

_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "F64": np.float64}


class SafetensorsError(ValueError):
    """A safetensors file is missing, truncated or not safetensors; the message names it."""


def read_header(file: str | Path) -> dict[str, dict]:
    """name -> {"dtype", "shape", "data_offsets"} (and "__metadata__" if present)."""
    file = Path(file)
    try:
        with open(file, "rb") as fh:
            raw = fh.read(8)
            if len(raw) < 8:
                raise SafetensorsError(f"{file}: truncated ({len(raw)} bytes): not a safetensors file")
            (n,) = struct.unpack("<Q", raw)
            size = file.stat().st_size
            if n > size - 8:
                raise SafetensorsError(
                    f"{file}: header length {n} exceeds the file ({size} bytes): truncated"
                )
            header = json.loads(fh.read(n))
    except (OSError, ValueError) as exc:
        if isinstance(exc, SafetensorsError):
            raise
        raise SafetensorsError(f"{file}: unreadable safetensors header ({exc})") from exc
    end = max((m["data_offsets"][1] for k, m in header.items() if k != "__metadata__"), default=0)
    if 8 + n + end > size:
        raise SafetensorsError(f"{file}: {size} bytes, but its header needs {8 + n + end}: truncated")
    return header


def dtype_counts(folder: str | Path) -> dict[str, int]:
    """dtype -> tensor count over a folder's *.safetensors."""
    counts: dict[str, int] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        for name, info in read_header(file).items():
            if name != "__metadata__":
                counts[info["dtype"]] = counts.get(info["dtype"], 0) + 1
    return counts


def load_file(file: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of one file as float32 numpy (bf16 widened exactly); other dtypes are an error."""
    file = Path(file)
    header = read_header(file)
    raw = np.memmap(file, dtype=np.uint8, mode="r")
    (n,) = struct.unpack("<Q", raw[:8].tobytes())
    out: dict[str, np.ndarray] = {}
    for name, meta in header.items():
        if name == "__metadata__":
            continue
        if meta["dtype"] not in _DTYPES:
            raise SafetensorsError(
                f"{file}: tensor {name} has dtype {meta['dtype']} (quantized?), not a float"
            )
        start, end = meta["data_offsets"]
        arr = np.frombuffer(raw[8 + n + start : 8 + n + end].tobytes(), dtype=_DTYPES[meta["dtype"]])
        if meta["dtype"] == "BF16":
            arr = (arr.astype(np.uint32) << 16).view(np.float32)
        out[name] = arr.astype(np.float32).reshape(meta["shape"])
    return out


def load_folder(folder: str | Path) -> dict[str, np.ndarray]:
    files = sorted(Path(folder).glob("*.safetensors"))
    if not files:
        raise SafetensorsError(f"{folder}: no *.safetensors weights")
    out: dict[str, np.ndarray] = {}
    for file in files:
        out.update(load_file(file))
    return out
