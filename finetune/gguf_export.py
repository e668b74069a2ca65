"""GGUF export of Llama-family HF folders, written the way llama.cpp's convert_hf_to_gguf.py writes them.

mlx-lm's `--export-gguf` labels every tokenizer SentencePiece, drops merges and the chat template and stores
token types as uint32: llama.cpp refuses or mis-tokenizes such files. Here the tokenizer is written as
llama.cpp expects it ("gpt2" + merges + pre-tokenizer name for ByteLevel BPE, "llama" + scores for
SentencePiece), with int32 token types, special ids, add_bos/add_eos and the chat template.
"""

from __future__ import annotations

import json
import os
import re
import struct
import tempfile
from dataclasses import dataclass
from hashlib import sha256
from pathlib import Path
from typing import Any

import gguf
import numpy as np

QT = gguf.GGMLQuantizationType
OUTTYPES: dict[str, tuple[Any, int]] = {
    "f32": (QT.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (QT.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}

# llama.cpp names its BPE pre-tokenizers by the sha256 of str(tokenizer.encode(CHKTXT)); the text and hashes
# are copied from convert_hf_to_gguf.py's get_vocab_base_pre (a subset: extend as models are added).
CHKTXT = (
    "\n \n\n \n\n\n \t \t\t \t\n  \n   \n    \n     \n🚀 (normal) 😶\u200d🌫️ (multiple emojis concatenated) ✅ 🦙🦙 "
    "3 33 333 3333 33333 333333 3333333 33333333 3.3 3..3 3...3 កាន់តែពិសេសអាច😁 ?我想在apple工作1314151天～ "
    "------======= нещо на Български ''''''```````\"\"\"\"......!!!!!!?????? I've been 'told he's there, "
    "'RE you sure? 'M not sure I'll make it, 'D you like some tea? We'Ve a'lL"
)
KNOWN_PRE_HASHES = {
    "855059429035d75a914d1eda9f10a876752e281a054a7a3d421ef0533e5b6249": "smollm",
    "3ce83efda5659b07b1ad37ca97ca5797ea4285d9b9ab0dc679e4a720c9da7454": "gpt-2",
    "0ef9807a4087ebef797fc749390439009c3b9eda9ad1a097abbe738f486c01e5": "llama-bpe",
    "e636dc30a262dcc0d8c323492e32ae2b70728f4df7dfe9737d9f920a282b8aea": "qwen2",
    "35d91631860c815f952d711435f48d356ebac988362536bed955d43bfa436e34": "starcoder",
    "049ecf7629871e3041641907f3de7c733e4dbfdc736f57d882ba0b0845599754": "deepseek-llm",
    "347715f544604f9118bb75ed199f68779f423cabb20db6de6f31b908d04d7821": "deepseek-coder",
    "8aeee3860c56296a157a1fe2fad249ec40aa59b1bb5709f4ade11c4e6fe652ed": "falcon",
}
TT = gguf.TokenType


class GGUFExportError(ValueError):
    """The HF folder cannot be exported (unsupported architecture, tokenizer, weights)."""


# --------------------------------------------------------------------------- model hyper-parameters


@dataclass(frozen=True)
class LlamaParams:
    n_layer: int
    n_embd: int
    n_ff: int
    n_head: int
    n_head_kv: int
    head_dim: int
    vocab_size: int
    n_ctx: int
    rope_theta: float
    rms_eps: float
    tied: bool
    attention_bias: bool = False
    mlp_bias: bool = False
    rope_scaling: dict[str, Any] | None = None


def llama_params(hf_dir: str | Path) -> LlamaParams:
    """Read config.json; transformers 5 moves rope_theta under rope_parameters, so read both places."""
    path = Path(hf_dir) / "config.json"
    if not path.is_file():
        raise GGUFExportError(f"{path}: not found (an HF model folder needs config.json)")
    cfg = json.loads(path.read_text(encoding="utf-8"))
    if cfg.get("model_type") != "llama":
        raise GGUFExportError(f"{path}: model_type {cfg.get('model_type')!r} is not supported (only 'llama')")
    if "quantization" in cfg or "quantization_config" in cfg:
        raise GGUFExportError(f"{path}: the model is quantized; fuse with dequantize=True first")
    try:
        n_embd, n_head = int(cfg["hidden_size"]), int(cfg["num_attention_heads"])
        rope = cfg.get("rope_parameters") or {}
        scaling = cfg.get("rope_scaling") or (rope if rope.get("rope_type", "default") != "default" else None)
        return LlamaParams(
            n_layer=int(cfg["num_hidden_layers"]),
            n_embd=n_embd,
            n_ff=int(cfg["intermediate_size"]),
            n_head=n_head,
            n_head_kv=int(cfg.get("num_key_value_heads") or n_head),
            head_dim=int(cfg.get("head_dim") or n_embd // n_head),
            vocab_size=int(cfg["vocab_size"]),
            n_ctx=int(cfg.get("max_position_embeddings", 2048)),
            rope_theta=float(cfg.get("rope_theta", rope.get("rope_theta", 10000.0))),
            rms_eps=float(cfg.get("rms_norm_eps", 1e-6)),
            tied=bool(cfg.get("tie_word_embeddings", False)),
            attention_bias=bool(cfg.get("attention_bias", False)),
            mlp_bias=bool(cfg.get("mlp_bias", False)),
            rope_scaling=scaling,
        )
    except KeyError as exc:
        raise GGUFExportError(f"{path}: missing key {exc.args[0]!r}") from None


def expected_tensor_shapes(p: LlamaParams) -> dict[str, tuple[int, ...]]:
    """GGUF tensor names and ggml shapes (innermost dimension first) llama.cpp's llama loader expects."""
    q, kv = p.n_head * p.head_dim, p.n_head_kv * p.head_dim
    out: dict[str, tuple[int, ...]] = {"token_embd.weight": (p.n_embd, p.vocab_size)}
    out["output_norm.weight"] = (p.n_embd,)
    if not p.tied:
        out["output.weight"] = (p.n_embd, p.vocab_size)
    for i in range(p.n_layer):
        b = f"blk.{i}."
        out |= {
            b + "attn_norm.weight": (p.n_embd,),
            b + "attn_q.weight": (p.n_embd, q),
            b + "attn_k.weight": (p.n_embd, kv),
            b + "attn_v.weight": (p.n_embd, kv),
            b + "attn_output.weight": (q, p.n_embd),
            b + "ffn_norm.weight": (p.n_embd,),
            b + "ffn_gate.weight": (p.n_embd, p.n_ff),
            b + "ffn_up.weight": (p.n_embd, p.n_ff),
            b + "ffn_down.weight": (p.n_ff, p.n_embd),
        }
        if p.attention_bias:
            out |= {b + "attn_q.bias": (q,), b + "attn_k.bias": (kv,), b + "attn_v.bias": (kv,)}
            out[b + "attn_output.bias"] = (p.n_embd,)
        if p.mlp_bias:
            out |= {
                b + "ffn_gate.bias": (p.n_ff,),
                b + "ffn_up.bias": (p.n_ff,),
                b + "ffn_down.bias": (p.n_embd,),
            }
    return out


# --------------------------------------------------------------------------- weights

_LAYER_MAP = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
    "post_attention_layernorm": "ffn_norm",
}
_TOP_MAP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}
_ST_DTYPES = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16}


def load_hf_tensors(hf_dir: str | Path) -> dict[str, np.ndarray]:
    """All safetensors of a folder as float32 numpy arrays (parsed by hand: numpy has no bfloat16)."""
    files = sorted(Path(hf_dir).glob("*.safetensors"))
    if not files:
        raise GGUFExportError(f"{hf_dir}: no *.safetensors weights")
    tensors: dict[str, np.ndarray] = {}
    for file in files:
        raw = np.memmap(file, dtype=np.uint8, mode="r")
        n = int(np.frombuffer(raw[:8].tobytes(), dtype="<u8")[0])
        header = json.loads(raw[8 : 8 + n].tobytes())
        header.pop("__metadata__", None)
        for name, meta in header.items():
            if meta["dtype"] not in _ST_DTYPES:
                raise GGUFExportError(
                    f"{file}: tensor {name} has dtype {meta['dtype']}; quantized weights must be fused "
                    "with dequantize=True before export"
                )
            start, end = meta["data_offsets"]
            arr = np.frombuffer(raw[8 + n + start : 8 + n + end].tobytes(), dtype=_ST_DTYPES[meta["dtype"]])
            if meta["dtype"] == "BF16":
                arr = (arr.astype(np.uint32) << 16).view(np.float32)
            tensors[name] = arr.astype(np.float32).reshape(meta["shape"])
    return tensors


def permute_qk(w: np.ndarray, n_head: int, n_head_kv: int | None = None) -> np.ndarray:
    """HF stores Q/K rows for rotate-half RoPE; llama.cpp's llama arch wants interleaved pairs (LlamaModel.permute)."""
    if n_head_kv is not None and n_head != n_head_kv:
        n_head = n_head_kv
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_tensors(tensors: dict[str, np.ndarray], p: LlamaParams) -> dict[str, np.ndarray]:
    """HF names -> GGUF names, with the Q/K permutation; unknown names are an error, not silently dropped."""
    out: dict[str, np.ndarray] = {}
    for name, arr in tensors.items():
        stem, _, kind = name.rpartition(".")
        if name.endswith("rotary_emb.inv_freq"):
            continue
        if m := re.fullmatch(r"model\.layers\.(\d+)\.(.+)", stem):
            layer, part = m.groups()
            if part not in _LAYER_MAP:
                raise GGUFExportError(f"tensor {name}: no GGUF name for {part!r}")
            new = f"blk.{layer}.{_LAYER_MAP[part]}.{kind}"
            if part == "self_attn.q_proj":
                arr = permute_qk(arr, p.n_head, p.n_head)
            elif part == "self_attn.k_proj":
                arr = permute_qk(arr, p.n_head, p.n_head_kv)
        elif stem in _TOP_MAP:
            new = f"{_TOP_MAP[stem]}.{kind}"
        else:
            raise GGUFExportError(f"tensor {name}: not a Llama tensor this exporter knows")
        out[new] = arr
    if p.tied:
        out.pop("output.weight", None)
    elif "output.weight" not in out:
        raise GGUFExportError("config says tie_word_embeddings=false but there is no lm_head.weight")
    return out


def _encode(arr: np.ndarray, qtype: Any) -> tuple[np.ndarray, Any]:
    """Norms and biases stay f32 as in convert_hf_to_gguf; q8_0 falls back to f16 for rows not divisible by 32."""
    if arr.ndim == 1 or qtype == QT.F32:
        return arr.astype(np.float32), QT.F32
    if qtype == QT.Q8_0 and arr.shape[-1] % 32 == 0:
        return gguf.quants.quantize(arr, QT.Q8_0), QT.Q8_0
    out = arr.astype(np.float16)
    if not np.isfinite(out).all():
        raise GGUFExportError("a weight overflows float16 (|x| > 65504): export with outtype='f32'")
    return out, QT.F16


# --------------------------------------------------------------------------- tokenizer


@dataclass(frozen=True)
class TokenizerSpec:
    """Everything llama.cpp needs to tokenize like the HF tokenizer."""

    model: str  # "gpt2" (ByteLevel BPE) or "llama" (SentencePiece)
    pre: str
    tokens: list[str]
    token_types: list[int]
    merges: list[str]
    special_ids: dict[str, int]
    add_bos: bool
    add_eos: bool
    chat_template: str | None
    scores: list[float] | None = None


def _looks_special(tok: str) -> bool:
    return (tok.startswith("<|") and tok.endswith("|>")) or tok in ("<pad>", "<mask>")


def build_tokenizer_spec(
    hf_dir: str | Path, *, vocab_size: int | None = None, pre: str | None = None, tokenizer: Any = None
) -> TokenizerSpec:
    """Derive the llama.cpp tokenizer of an HF folder (convert_hf_to_gguf's _set_vocab_gpt2 / _sentencepiece)."""
    hf_dir = Path(hf_dir)
    if tokenizer is None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(str(hf_dir))
    vocab_size = vocab_size or llama_params(hf_dir).vocab_size
    tj_path = hf_dir / "tokenizer.json"
    tj = json.loads(tj_path.read_text(encoding="utf-8")) if tj_path.is_file() else {}
    tj_model = tj.get("model", {})
    is_spm = (hf_dir / "tokenizer.model").is_file() or bool(tj_model.get("byte_fallback"))
    if is_spm:
        model, tokens, types, scores = "llama", *_spm_vocab(hf_dir, vocab_size)
        pre = pre or "default"
    elif tj_model.get("type") == "BPE":
        model, scores = "gpt2", None
        tokens, types = _bpe_vocab(tokenizer, vocab_size)
        if pre is None:
            digest = sha256(str(tokenizer.encode(CHKTXT)).encode()).hexdigest()
            if digest not in KNOWN_PRE_HASHES:
                raise GGUFExportError(
                    f"{hf_dir}: BPE pre-tokenizer not recognised (hash {digest}); pass pre= with llama.cpp's "
                    "name for it (see convert_hf_to_gguf.py get_vocab_base_pre)"
                )
            pre = KNOWN_PRE_HASHES[digest]
    else:
        raise GGUFExportError(
            f"{hf_dir}: unsupported tokenizer (need tokenizer.model or a BPE tokenizer.json)"
        )
    special = gguf.SpecialVocab(hf_dir, load_merges=model == "gpt2", n_vocab=vocab_size)
    if model == "gpt2" and not special.merges:
        raise GGUFExportError(f"{tj_path}: a BPE tokenizer without merges cannot be exported")
    template = special.chat_template
    if isinstance(template, list):  # several named templates: llama.cpp's default is the one named "default"
        template = next((t["template"] for t in template if t.get("name") == "default"), None)
    plain, full = tokenizer.encode("a", add_special_tokens=False), tokenizer.encode("a")
    bos, eos = tokenizer.bos_token_id, tokenizer.eos_token_id
    return TokenizerSpec(
        model=model,
        pre=pre,
        tokens=tokens,
        token_types=types,
        merges=list(special.merges),
        special_ids=dict(special.special_token_ids),
        add_bos=bos is not None and len(full) > len(plain) and full[0] == bos,
        add_eos=eos is not None and len(full) > len(plain) and full[-1] == eos,
        chat_template=template,
        scores=scores,
    )


def _bpe_vocab(tokenizer: Any, vocab_size: int) -> tuple[list[str], list[int]]:
    reverse = {i: t for t, i in tokenizer.get_vocab().items()}
    if max(reverse) >= vocab_size:
        raise GGUFExportError(f"tokenizer has id {max(reverse)} but config vocab_size is {vocab_size}")
    added, decoder = tokenizer.get_added_vocab(), tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(vocab_size):
        tok = reverse.get(i)
        if tok is None:
            tokens.append(f"[PAD{i}]")
            types.append(int(TT.UNUSED))
            continue
        if tok in added:
            # llama.cpp treats added tokens as pre-normalised text, so store them as the tokenizer decodes them.
            if not decoder[i].normalized:
                tok = tokenizer.decode(tokenizer.encode(tok, add_special_tokens=False))
            special = decoder[i].special or _looks_special(tok)
            types.append(int(TT.CONTROL if special else TT.USER_DEFINED))
        else:
            types.append(int(TT.NORMAL))
        tokens.append(tok)
    return tokens, types


def _spm_vocab(hf_dir: Path, vocab_size: int) -> tuple[list[str], list[int], list[float]]:
    rows: list[tuple[str, float, int]] = []
    if not (hf_dir / "tokenizer.model").is_file():
        # tokenizer.json with byte_fallback (a Llama-2 style HF export): gguf's own reader handles it.
        rows = [(t.decode("utf-8"), s, int(k)) for t, s, k in gguf.LlamaHfVocab(hf_dir).all_tokens()]
    else:
        from sentencepiece import SentencePieceProcessor

        sp = SentencePieceProcessor(model_file=str(hf_dir / "tokenizer.model"))
        for i in range(sp.vocab_size()):
            kind = TT.NORMAL
            if sp.IsUnknown(i):
                kind = TT.UNKNOWN
            elif sp.IsControl(i):
                kind = TT.CONTROL
            elif sp.IsUnused(i):
                kind = TT.UNUSED
            elif sp.IsByte(i):
                kind = TT.BYTE
            rows.append((sp.IdToPiece(i), sp.GetScore(i), int(kind)))
        cfg_path = hf_dir / "tokenizer_config.json"
        cfg = json.loads(cfg_path.read_text("utf-8")) if cfg_path.is_file() else {}
        for sid, data in cfg.get("added_tokens_decoder", {}).items():
            i, text = int(sid), data["content"]
            rows += [(f"[PAD{j}]", -1000.0, int(TT.UNUSED)) for j in range(len(rows), i + 1)]
            if data.get("special") or _looks_special(text):
                rows[i] = (text, -1000.0, int(TT.CONTROL))
            else:  # llama.cpp expects user-defined tokens pre-normalised: real spaces, not U+2581
                rows[i] = (text.replace("\u2581", " "), -1000.0, int(TT.USER_DEFINED))
    rows += [(f"[PAD{j}]", -1000.0, int(TT.UNUSED)) for j in range(len(rows), vocab_size)]
    rows = rows[:vocab_size]
    return [r[0] for r in rows], [r[2] for r in rows], [r[1] for r in rows]


# --------------------------------------------------------------------------- writing


def export_gguf(
    hf_dir: str | Path,
    out_path: str | Path,
    *,
    outtype: str = "f16",
    tokenizer_spec: TokenizerSpec | None = None,
    name: str | None = None,
) -> Path:
    """Write a llama.cpp-loadable GGUF of a Llama HF folder (full-precision weights) atomically."""
    if outtype not in OUTTYPES:
        raise GGUFExportError(f"outtype {outtype!r}: choose one of {sorted(OUTTYPES)}")
    hf_dir, out_path = Path(hf_dir), Path(out_path)
    p = llama_params(hf_dir)
    if p.rope_scaling and p.rope_scaling.get("rope_type", p.rope_scaling.get("type")) not in ("linear", None):
        raise GGUFExportError(f"{hf_dir}/config.json: rope scaling {p.rope_scaling} is not supported")
    spec = tokenizer_spec or build_tokenizer_spec(hf_dir, vocab_size=p.vocab_size)
    tensors = gguf_tensors(load_hf_tensors(hf_dir), p)
    qtype, ftype = OUTTYPES[outtype]

    out_path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=out_path.parent, prefix=f".{out_path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        w = gguf.GGUFWriter(tmp, "llama")
        w.add_name(name or hf_dir.name)
        w.add_context_length(p.n_ctx)
        w.add_embedding_length(p.n_embd)
        w.add_block_count(p.n_layer)
        w.add_feed_forward_length(p.n_ff)
        w.add_head_count(p.n_head)
        w.add_head_count_kv(p.n_head_kv)
        w.add_rope_freq_base(p.rope_theta)
        w.add_layer_norm_rms_eps(p.rms_eps)
        w.add_key_length(p.head_dim)
        w.add_value_length(p.head_dim)
        w.add_rope_dimension_count(p.head_dim)
        w.add_vocab_size(p.vocab_size)
        w.add_file_type(int(ftype))
        if p.rope_scaling:
            w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
            w.add_rope_scaling_factor(float(p.rope_scaling["factor"]))
        _add_tokenizer(w, spec)
        for tname, arr in tensors.items():
            data, dtype = _encode(arr, qtype)
            w.add_tensor(tname, data, raw_dtype=dtype)
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; a model file is as readable as any other output
        os.replace(tmp, out_path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return out_path


def _add_tokenizer(w: gguf.GGUFWriter, spec: TokenizerSpec) -> None:
    w.add_tokenizer_model(spec.model)
    w.add_tokenizer_pre(spec.pre)
    w.add_token_list(spec.tokens)
    if spec.scores is not None:
        w.add_token_scores([float(s) for s in spec.scores])
    w.add_token_types([int(t) for t in spec.token_types])  # python ints -> GGUF INT32 arrays
    if spec.merges:
        w.add_token_merges(spec.merges)
    for kind, tid in spec.special_ids.items():
        if (adder := getattr(w, f"add_{kind}_token_id", None)) is not None:
            adder(int(tid))
    w.add_add_bos_token(spec.add_bos)
    w.add_add_eos_token(spec.add_eos)
    if spec.chat_template:
        w.add_chat_template(spec.chat_template)


# --------------------------------------------------------------------------- reading and checking


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
