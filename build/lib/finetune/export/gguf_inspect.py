"""Reading a GGUF header without llama.cpp, and check_gguf: what would make llama.cpp refuse or misread a file."""

from __future__ import annotations

import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from finetune.export.gguf_params import GGUFExportError, expected_tensor_shapes, llama_params
from finetune.export.gguf_tokenizer import TokenizerSpec, build_tokenizer_spec

QT = gguf.GGMLQuantizationType


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


def _read_header(path: Path) -> tuple[dict[str, tuple[Any, Any]], list[GGUFTensor]]:
    """Parse the GGUF header directly: gguf.GGUFReader spends 2.5-4 s on a 49k-token vocab here (memmap views)."""
    with open(path, "rb") as fh:
        buf = fh.read(min(os.path.getsize(path), 64 << 20))  # headers of these models are a few MB
    if buf[:4] != b"GGUF":
        raise GGUFExportError(f"{path}: not a GGUF file (magic {buf[:4]!r})")
    version, n_tensors, n_kv = struct.unpack_from("<IQQ", buf, 4)
    pos = 24

    def string() -> str:
        nonlocal pos
        (n,) = struct.unpack_from("<Q", buf, pos)
        pos += 8 + n
        return buf[pos - n : pos].decode("utf-8", errors="replace")

    def value(vtype: Any) -> Any:
        nonlocal pos
        if vtype == _VT.STRING:
            return string()
        fmt = _SCALARS[vtype]
        (v,) = struct.unpack_from(fmt, buf, pos)
        pos += struct.calcsize(fmt)
        return v

    fields: dict[str, tuple[Any, Any]] = {}
    try:
        for _ in range(n_kv):
            key = string()
            (vt,) = struct.unpack_from("<I", buf, pos)
            pos += 4
            if _VT(vt) != _VT.ARRAY:
                fields[key] = (_VT(vt), value(_VT(vt)))
                continue
            sub, count = struct.unpack_from("<IQ", buf, pos)
            pos += 12
            if _VT(sub) in (_VT.STRING, _VT.ARRAY):
                items = [value(_VT(sub)) for _ in range(count)]
            else:
                dtype = np.dtype(_SCALARS[_VT(sub)])
                items = np.frombuffer(buf, dtype=dtype, count=count, offset=pos).tolist()
                pos += dtype.itemsize * count
            fields[key] = (_VT(sub), items)
        tensors = []
        for _ in range(n_tensors):
            name = string()
            (n_dims,) = struct.unpack_from("<I", buf, pos)
            dims = struct.unpack_from(f"<{n_dims}Q", buf, pos + 4)
            (qtype,) = struct.unpack_from("<I", buf, pos + 4 + 8 * n_dims)
            pos += 4 + 8 * n_dims + 4 + 8
            tensors.append(GGUFTensor(name, tuple(int(d) for d in dims), QT(qtype).name))
    except (struct.error, ValueError, IndexError) as exc:
        raise GGUFExportError(f"{path}: truncated or corrupt GGUF v{version} header ({exc})") from exc
    return fields, tensors


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


def check_gguf(path: str | Path, hf_dir: str | Path, *, spec: TokenizerSpec | None = None) -> list[str]:
    """Problems that would make llama.cpp refuse the file or behave unlike the HF model (empty list = ok)."""
    info, p = inspect_gguf(path), llama_params(hf_dir)
    spec = spec or build_tokenizer_spec(hf_dir, vocab_size=p.vocab_size)
    name, meta = Path(path).name, info.metadata
    problems: list[str] = []
    if info.architecture != "llama":
        problems.append(f"{name}: general.architecture is {info.architecture!r}, expected 'llama'")
    for key, want in (
        ("block_count", p.n_layer),
        ("embedding_length", p.n_embd),
        ("feed_forward_length", p.n_ff),
        ("attention.head_count", p.n_head),
        ("attention.head_count_kv", p.n_head_kv),
        ("context_length", p.n_ctx),
        ("rope.freq_base", p.rope_theta),
        ("attention.layer_norm_rms_epsilon", p.rms_eps),
    ):
        got = meta.get(f"llama.{key}")
        if got is None or abs(float(got) - float(want)) > 1e-6 * max(1.0, abs(float(want))):
            problems.append(f"{name}: llama.{key} is {got}, HF config says {want}")
    want_shapes, got_shapes = expected_tensor_shapes(p), {t.name: t.shape for t in info.tensors}
    if len(got_shapes) != len(want_shapes):
        problems.append(f"{name}: {len(got_shapes)} tensors, expected {len(want_shapes)}")
    if missing := sorted(set(want_shapes) - set(got_shapes)):
        problems.append(f"{name}: missing tensors {missing[:5]}{' ...' if len(missing) > 5 else ''}")
    if extra := sorted(set(got_shapes) - set(want_shapes)):
        problems.append(f"{name}: unexpected tensors {extra[:5]}{' ...' if len(extra) > 5 else ''}")
    for tname in sorted(set(want_shapes) & set(got_shapes)):
        if got_shapes[tname] != want_shapes[tname]:
            problems.append(
                f"{name}: tensor {tname} has shape {got_shapes[tname]}, expected {want_shapes[tname]}"
            )
    problems += _check_tokenizer(name, info, spec)
    return problems


def _check_tokenizer(name: str, info: GGUFInfo, spec: TokenizerSpec) -> list[str]:
    problems = []
    if info.tokenizer_model != spec.model:
        problems.append(
            f"{name}: tokenizer.ggml.model is {info.tokenizer_model!r}, the HF tokenizer needs {spec.model!r}"
        )
    if info.tokenizer_pre != spec.pre:
        problems.append(f"{name}: tokenizer.ggml.pre is {info.tokenizer_pre!r}, expected {spec.pre!r}")
    if info.tokens != spec.tokens:
        bad = next(
            (i for i, (a, b) in enumerate(zip(info.tokens, spec.tokens, strict=False)) if a != b), None
        )
        problems.append(
            f"{name}: {len(info.tokens)} tokens vs HF {len(spec.tokens)}; first difference at id {bad}"
        )
    if info.token_type_kind != "INT32":
        problems.append(
            f"{name}: tokenizer.ggml.token_type is an array of {info.token_type_kind}; llama.cpp needs INT32"
        )
    elif info.token_types != spec.token_types:
        bad = [i for i, (a, b) in enumerate(zip(info.token_types, spec.token_types, strict=False)) if a != b]
        problems.append(f"{name}: token types differ from HF at {len(bad)} ids (first {bad[:5]})")
    if spec.model == "gpt2" and info.merges != spec.merges:
        problems.append(f"{name}: {len(info.merges)} merges, the HF tokenizer has {len(spec.merges)}")
    if spec.model == "llama" and not info.scores:
        problems.append(f"{name}: SentencePiece vocab without tokenizer.ggml.scores")
    for kind, tid in spec.special_ids.items():
        if info.special_ids.get(kind) != tid:
            problems.append(f"{name}: {kind} token id is {info.special_ids.get(kind)}, HF says {tid}")
    if info.add_bos != spec.add_bos:  # when absent, llama.cpp guesses from the vocab type
        problems.append(f"{name}: add_bos_token is {info.add_bos}, the HF tokenizer adds BOS: {spec.add_bos}")
    if spec.chat_template and not info.chat_template:
        problems.append(f"{name}: no tokenizer.chat_template (the HF tokenizer has one)")
    elif spec.chat_template and info.chat_template != spec.chat_template:
        problems.append(f"{name}: tokenizer.chat_template differs from the HF one")
    return problems
