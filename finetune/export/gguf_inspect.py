"""Reading a GGUF header without llama.cpp; check_gguf: what would make llama.cpp refuse or misread a file."""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

QT = gguf.GGMLQuantizationType


class GGUFReadError(ValueError):
    """Not a GGUF file, or a truncated or corrupt header; the message names the file."""


@dataclass(frozen=True)
class GGUFTensor:
    name: str
    shape: tuple[int, ...]  # ggml order: innermost dimension first
    type: str


@dataclass(frozen=True)
class GGUFInfo:
    path: Path
    architecture: str | None
    metadata: dict[str, Any]  # scalar keys only; token arrays are in the fields below
    tensors: list[GGUFTensor]
    tokenizer_model: str | None
    tokenizer_pre: str | None
    tokens: list[str]
    token_types: list[int]
    token_type_kind: str | None  # GGUF element type of tokenizer.ggml.token_type ("INT32" is right)
    merges: list[str]
    scores: list[float] | None
    special_ids: dict[str, int]
    add_bos: bool | None
    add_eos: bool | None
    chat_template: str | None


_VT = gguf.GGUFValueType
_SCALARS = {
    _VT.UINT8: "<B",
    _VT.INT8: "<b",
    _VT.UINT16: "<H",
    _VT.INT16: "<h",
    _VT.UINT32: "<I",
    _VT.INT32: "<i",
    _VT.FLOAT32: "<f",
    _VT.BOOL: "<?",
    _VT.UINT64: "<Q",
    _VT.INT64: "<q",
    _VT.FLOAT64: "<d",
}


def _read_header(
    path: Path, spans: dict[str, tuple[int, int]] | None = None
) -> tuple[dict[str, tuple[Any, Any]], list[GGUFTensor]]:
    """Parse the GGUF header directly: gguf.GGUFReader spends 2.5-4 s on a 49k-token vocab here (memmap views).

    With `spans`, records where each scalar value's bytes (a string's length prefix included) lie, and the
    header's end under the key "" (for rewrite_string and rewrite_number)."""
    with open(path, "rb") as fh:
        buf = fh.read(min(os.path.getsize(path), 64 << 20))  # headers of these models are a few MB
    if buf[:4] != b"GGUF":
        raise GGUFReadError(f"{path}: not a GGUF file (magic {buf[:4]!r})")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    cur = _Cursor(buf, 24)
    try:
        fields = _read_fields(cur, n_kv, spans)
        tensors = [_read_tensor(cur) for _ in range(n_tensors)]
        if spans is not None:
            spans[""] = (cur.pos, cur.pos)
    except (struct.error, ValueError, IndexError) as exc:
        raise GGUFReadError(f"{path}: truncated or corrupt GGUF v{version} header ({exc})") from exc
    return fields, tensors


class _Cursor:
    """Little-endian GGUF values read one after another from a buffer."""

    def __init__(self, buf: bytes, pos: int):
        self.buf, self.pos = buf, pos

    def unpack(self, fmt: str) -> tuple:
        out = struct.unpack_from(fmt, self.buf, self.pos)
        self.pos += struct.calcsize(fmt)
        return out

    def string(self) -> str:
        (n,) = self.unpack("<Q")
        self.pos += n
        return self.buf[self.pos - n : self.pos].decode("utf-8", errors="replace")

    def value(self, vtype: Any) -> Any:
        if vtype == _VT.STRING:
            return self.string()
        (v,) = self.unpack(_SCALARS[vtype])
        return v

    def array(self, vtype: Any, count: int) -> list:
        if vtype in (_VT.STRING, _VT.ARRAY):
            return [self.value(vtype) for _ in range(count)]
        dtype = np.dtype(_SCALARS[vtype])  # numbers in one go: a vocabulary has tens of thousands
        items = np.frombuffer(self.buf, dtype=dtype, count=count, offset=self.pos).tolist()
        self.pos += dtype.itemsize * count
        return items


def _read_fields(
    cur: _Cursor, n_kv: int, spans: dict[str, tuple[int, int]] | None
) -> dict[str, tuple[Any, Any]]:
    """key -> (value type, value); an array's type is its elements' type."""
    fields: dict[str, tuple[Any, Any]] = {}
    for _ in range(n_kv):
        key = cur.string()
        (vt,) = cur.unpack("<I")
        if _VT(vt) != _VT.ARRAY:
            start = cur.pos
            fields[key] = (_VT(vt), cur.value(_VT(vt)))
            if spans is not None:
                spans[key] = (start, cur.pos)
            continue
        sub, count = cur.unpack("<IQ")
        fields[key] = (_VT(sub), cur.array(_VT(sub), count))
    return fields


def _read_tensor(cur: _Cursor) -> GGUFTensor:
    name = cur.string()
    (n_dims,) = cur.unpack("<I")
    dims = cur.unpack(f"<{n_dims}Q")
    (qtype,) = cur.unpack("<I")
    cur.pos += 8  # the data offset: not needed to describe the tensor
    return GGUFTensor(name, tuple(int(d) for d in dims), QT(qtype).name)


def inspect_gguf(path: str | Path) -> GGUFInfo:
    """Metadata, tensors and tokenizer of a GGUF file (read directly; no llama.cpp involved)."""
    path = Path(path)
    fields, tensors = _read_header(path)
    meta = {k: v for k, (t, v) in fields.items() if not isinstance(v, list)}
    arrays = {k: v for k, (t, v) in fields.items() if isinstance(v, list)}
    kind_of = {k: t.name for k, (t, v) in fields.items() if isinstance(v, list)}
    special = {}
    for kind, key in (
        ("bos", "bos_token_id"),
        ("eos", "eos_token_id"),
        ("unk", "unknown_token_id"),
        ("pad", "padding_token_id"),
        ("sep", "seperator_token_id"),
    ):
        if f"tokenizer.ggml.{key}" in meta:
            special[kind] = int(meta[f"tokenizer.ggml.{key}"])
    return GGUFInfo(
        path=path,
        architecture=meta.get("general.architecture"),
        metadata=meta,
        tensors=tensors,
        tokenizer_model=meta.get("tokenizer.ggml.model"),
        tokenizer_pre=meta.get("tokenizer.ggml.pre"),
        tokens=arrays.get("tokenizer.ggml.tokens", []),
        token_types=[int(t) for t in arrays.get("tokenizer.ggml.token_type", [])],
        token_type_kind=kind_of.get("tokenizer.ggml.token_type"),
        merges=arrays.get("tokenizer.ggml.merges", []),
        scores=arrays.get("tokenizer.ggml.scores"),
        special_ids=special,
        add_bos=meta.get("tokenizer.ggml.add_bos_token"),
        add_eos=meta.get("tokenizer.ggml.add_eos_token"),
        chat_template=meta.get("tokenizer.chat_template"),
    )


def _config_value(cfg: dict[str, Any], *keys: str) -> Any:
    text = cfg.get("text_config") if isinstance(cfg.get("text_config"), dict) else {}
    for key in keys:
        for source in (cfg, text):
            if source.get(key) is not None:
                return source[key]
    return None


def config_context_length(cfg: dict[str, Any]) -> int | None:
    """The context length an HF config declares (what check_gguf holds the GGUF's `<arch>.context_length` to)."""
    value = _config_value(cfg, *_VALUE_KEYS["context_length"])
    return int(value) if value is not None else None


def expected_tokenizer_model(hf_dir: Path) -> str | None:
    """ "llama" (SentencePiece) or "gpt2" (byte-level BPE) as llama.cpp names them, from the HF tokenizer files."""
    if (hf_dir / "tokenizer.model").is_file():
        return "llama"
    try:
        model = json.loads((hf_dir / "tokenizer.json").read_text(encoding="utf-8")).get("model", {})
    except (OSError, ValueError):
        return None
    if model.get("type") == "Unigram" or model.get("byte_fallback"):
        return "llama"
    return "gpt2" if model.get("type") == "BPE" else None


# GGUF key (after "<arch>.") -> the HF config keys that may hold the same value (Llama style, GPT-2 style);
# compared key by key wherever both sides have one (a wrong context, rope base or epsilon computes otherwise).
_VALUE_KEYS = {
    "block_count": ("num_hidden_layers", "n_layer"),
    "embedding_length": ("hidden_size", "n_embd"),
    "context_length": ("max_position_embeddings", "n_positions", "n_ctx"),
    "feed_forward_length": ("intermediate_size", "n_inner"),
    "attention.head_count": ("num_attention_heads", "n_head"),
    "attention.head_count_kv": ("num_key_value_heads",),
    "attention.key_length": ("head_dim",),
    "attention.sliding_window": ("sliding_window",),
    "rope.freq_base": ("rope_theta",),
    "attention.layer_norm_rms_epsilon": ("rms_norm_eps",),
    "attention.layer_norm_epsilon": ("layer_norm_epsilon", "layer_norm_eps"),
}


def _same(got: Any, want: Any) -> bool:
    if isinstance(want, float) or isinstance(got, float):  # GGUF keeps float32
        return abs(float(got) - float(want)) <= 1e-6 * max(1.0, abs(float(want)))
    return got == want


def check_gguf(path: str | Path, hf_dir: str | Path) -> list[str]:
    """What would make llama.cpp refuse the file or read it unlike the HF folder (empty list = ok).

    Independent of the converter: it compares what the file says with the HF config and tokenizer files.
    How the file tokenizes and computes is judged by the gguf_tokenizer and logprob_parity gates.
    """
    path, hf_dir = Path(path), Path(hf_dir)
    info = inspect_gguf(path)
    cfg = json.loads((hf_dir / "config.json").read_text())
    name, meta, arch = path.name, info.metadata, info.architecture
    problems: list[str] = []
    if not arch:
        return [f"{name}: no general.architecture"]
    for key, hf_keys in _VALUE_KEYS.items():
        want, got = _config_value(cfg, *hf_keys), meta.get(f"{arch}.{key}")
        if want is not None and got is not None and not _same(got, want):
            problems.append(f"{name}: {arch}.{key} is {got}, HF config says {want}")
        elif want is not None and got is None and key in ("block_count", "embedding_length"):
            problems.append(f"{name}: no {arch}.{key}, HF config says {want}")
    if meta.get(f"{arch}.context_length") is None:
        problems.append(f"{name}: no {arch}.context_length")
    if not info.tensors or len({t.name for t in info.tensors}) != len(info.tensors):
        problems.append(f"{name}: {len(info.tensors)} tensors, or duplicate tensor names")
    vocab = _config_value(cfg, "vocab_size")
    if vocab is not None and len(info.tokens) != vocab:
        problems.append(f"{name}: {len(info.tokens)} tokens, the HF config's vocab_size is {vocab}")
    want_model = expected_tokenizer_model(hf_dir)
    if want_model and info.tokenizer_model != want_model:
        problems.append(
            f"{name}: tokenizer.ggml.model is {info.tokenizer_model!r}, the HF tokenizer is {want_model!r}"
        )
    if info.token_type_kind != "INT32":
        problems.append(
            f"{name}: tokenizer.ggml.token_type is an array of {info.token_type_kind}; llama.cpp needs INT32"
        )
    try:
        hf_template = json.loads((hf_dir / "tokenizer_config.json").read_text()).get("chat_template")
    except (OSError, ValueError):
        hf_template = None
    if isinstance(hf_template, str) and info.chat_template != hf_template:
        problems.append(f"{name}: tokenizer.chat_template differs from the HF tokenizer_config.json's")
    return problems


def rewrite_string(path: str | Path, key: str, value: str | None) -> str | None:
    """Return a string metadata value; with `value`, replace it in place (tensor data bytes are copied as
    they are: their offsets are relative to the aligned data section, which is moved, not changed)."""
    path, spans = Path(path), {}
    fields, _ = _read_header(path, spans)
    if key not in spans:
        raise GGUFReadError(f"{path}: no string metadata key {key!r}")
    if fields[key][0] != _VT.STRING:
        raise GGUFReadError(f"{path}: metadata key {key!r} is not a string")
    current = fields[key][1]
    if value is None:
        return current
    align = int(fields.get("general.alignment", (None, 32))[1])
    start, end = spans[key]
    header_end = spans[""][0]
    data_start = header_end + (-header_end % align)
    raw = value.encode("utf-8")
    with open(path, "rb") as fh:
        head = fh.read(header_end)
        fh.seek(data_start)
        tmp = path.with_name(f".{path.name}.rewrite")
        new_head = head[:start] + struct.pack("<Q", len(raw)) + raw + head[end:]
        with open(tmp, "wb") as out:
            out.write(new_head + b"\0" * (-len(new_head) % align))
            while chunk := fh.read(1 << 24):
                out.write(chunk)
    os.replace(tmp, path)
    return current


def rewrite_number(path: str | Path, key: str, value: float) -> float:
    """Replace a numeric scalar metadata value in place (same type, so the same size); return the old one."""
    path, spans = Path(path), {}
    fields, _ = _read_header(path, spans)
    vtype, current = fields.get(key, (None, None))
    if key not in spans or vtype not in _SCALARS or vtype == _VT.BOOL:
        raise GGUFReadError(f"{path}: no numeric metadata key {key!r}")
    with open(path, "r+b") as fh:
        fh.seek(spans[key][0])
        fh.write(struct.pack(_SCALARS[vtype], type(current)(value)))
    return current
