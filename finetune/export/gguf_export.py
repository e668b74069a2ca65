"""GGUF export of Llama-family HF folders, written the way llama.cpp's convert_hf_to_gguf.py writes them.

mlx-lm's `--export-gguf` labels every tokenizer SentencePiece, drops merges and the chat template and stores
token types as uint32: llama.cpp refuses or mis-tokenizes such files. Here the tokenizer is written as
llama.cpp expects it ("gpt2" + merges + pre-tokenizer name for ByteLevel BPE, "llama" + scores for
SentencePiece), with int32 token types, special ids, add_bos/add_eos and the chat template (gguf_tokenizer).
"""

from __future__ import annotations

import os
import re
import tempfile
from pathlib import Path
from typing import Any

import gguf
import numpy as np

from finetune.export.gguf_params import GGUFExportError, LlamaParams, llama_params
from finetune.export.gguf_tokenizer import TokenizerSpec, add_tokenizer, build_tokenizer_spec
from finetune.models.safetensors import SafetensorsError, load_folder

QT = gguf.GGMLQuantizationType
OUTTYPES: dict[str, tuple[Any, int]] = {
    "f32": (QT.F32, gguf.LlamaFileType.ALL_F32),
    "f16": (QT.F16, gguf.LlamaFileType.MOSTLY_F16),
    "q8_0": (QT.Q8_0, gguf.LlamaFileType.MOSTLY_Q8_0),
}


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


def load_hf_tensors(hf_dir: str | Path) -> dict[str, np.ndarray]:
    try:
        return load_folder(hf_dir)
    except SafetensorsError as exc:
        raise GGUFExportError(
            f"{exc}; quantized weights must be fused with dequantize=True before export"
        ) from exc


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
        add_tokenizer(w, spec)
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
