"""GGUF export through llama.cpp's own converter (convert_hf_to_gguf.py, finetune.export.converter fetches it).

It knows every architecture llama.cpp runs (354 model classes), writes the tokenizer the way llama.cpp reads
it, and is the same build as the xllamacpp runtime FineTune checks GGUFs with. FineTune keeps its own checks
as the independent judge (gguf_inspect.check_gguf; the tokenizer and logprob gates against HF and MLX).

GPT-2 needs two fixes, applied in a temporary overlay of symlinks (the input folder is never modified):
transformers 5 writes no n_ctx (the converter needs it = n_positions), and Ollama 0.5.4's older llama.cpp
needs an explicit output.weight that the converter omits for tied GPT-2 (a copy of wte is added).
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

from finetune import faults
from finetune.errors import UserError
from finetune.export.converter import fetch_converter
from finetune.export.gguf_inspect import inspect_gguf, rewrite_number, rewrite_string
from finetune.models.convert import EXPORT_OVERRIDES
from finetune.system.procs import run_guarded

OUTTYPES = ("f32", "f16", "bf16", "q8_0")


class GGUFExportError(UserError):
    """llama.cpp's converter refused the folder (e.g. an architecture it does not know), crashed or timed out;
    the message carries its reason."""


def _reason(stderr: str, stdout: str = "", n: int = 8) -> str:
    """The converter's final exception line(s) first, then the tail of its log."""
    lines = (stderr or "").splitlines() + (stdout or "").splitlines()
    errs = [
        ln
        for ln in lines
        if ln.startswith(("Traceback", "ERROR", "CRITICAL")) or ("Error:" in ln) or "Exception" in ln
    ]
    picked = errs[-4:] + [ln for ln in lines[-n:] if ln not in errs[-4:]]
    return "\n  " + "\n  ".join(picked) if picked else ""


def _st_header(path: Path) -> tuple[dict, int]:
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return json.loads(f.read(n)), 8 + n


def _gpt2_lm_head_file(hf_dir: Path, dst: Path) -> bool:
    """Write dst (a one-tensor safetensors file) with lm_head.weight = the embedding, byte for byte, any dtype.
    Returns False when the folder already has an lm_head or no embedding was found."""
    parts = sorted(hf_dir.glob("model*.safetensors"))
    headers = [(p, *_st_header(p)) for p in parts]
    if any(k.endswith("lm_head.weight") for _, h, _ in headers for k in h):
        return False
    for p, h, base in headers:
        for key in ("wte.weight", "transformer.wte.weight"):
            if key in h:
                info = h[key]
                a, b = info["data_offsets"]
                with open(p, "rb") as f:
                    f.seek(base + a)
                    data = f.read(b - a)
                hdr = json.dumps(
                    {
                        "__metadata__": {"format": "pt"},
                        "lm_head.weight": {
                            "dtype": info["dtype"],
                            "shape": info["shape"],
                            "data_offsets": [0, len(data)],
                        },
                    }
                ).encode()
                hdr += b" " * (-len(hdr) % 8)
                dst.write_bytes(struct.pack("<Q", len(hdr)) + hdr + data)
                return True
    return False


EXTRAS = (
    EXPORT_OVERRIDES  # files in here replace the folder's own for the conversion only (Gemma's tokenizer)
)


def _overlay(hf_dir: Path, tmp: Path, *, fix_gpt2_n_ctx: bool, gpt2_output: bool) -> Path:
    """hf_dir itself, or a temp folder of symlinks to it with a patched config.json, an extra weights file
    (GPT-2) or the files of hf_dir/finetune_export/ in place of the folder's own."""
    cfg = json.loads((hf_dir / "config.json").read_text())
    extras = {p.name: p for p in (hf_dir / EXTRAS).iterdir()} if (hf_dir / EXTRAS).is_dir() else {}
    gpt2 = cfg.get("model_type") == "gpt2"
    if not gpt2 and not extras:
        return hf_dir
    names = [k for p in sorted(hf_dir.glob("model*.safetensors")) for k in _st_header(p)[0]]
    if gpt2 and any(k.startswith("model.h.") or k == "model.wte.weight" for k in names):
        raise GGUFExportError(
            f"{hf_dir}: GPT-2 weights in mlx_lm's layout (model.h.N..., nn.Linear (out, in) weights); "
            "finetune.export.layout.to_base_layout() rewrites it (the converter would fail with "
            "\"Can not map tensor 'model.h.0.attn.c_attn.bias'\")"
        )
    src = tmp / hf_dir.name  # the converter derives general.name from the folder name
    src.mkdir()
    for f in hf_dir.iterdir():
        if f.name not in ("config.json", "model.safetensors.index.json", EXTRAS, *extras):
            (src / f.name).symlink_to(f)
    for name, f in extras.items():
        (src / name).symlink_to(f)
    if gpt2 and fix_gpt2_n_ctx and "n_ctx" not in cfg:
        cfg["n_ctx"] = cfg.get("n_positions", 1024)
    (src / "config.json").write_text(json.dumps(cfg, indent=2))
    index = hf_dir / "model.safetensors.index.json"
    idx = json.loads(index.read_text()) if index.is_file() else None
    if gpt2 and gpt2_output and cfg.get("tie_word_embeddings", True):
        extra = "model-zz-lm_head.safetensors"  # the converter reads every model*.safetensors (or the index)
        if _gpt2_lm_head_file(hf_dir, src / extra) and idx is not None:
            idx["weight_map"]["lm_head.weight"] = extra
    if idx is not None:
        (src / index.name).write_text(json.dumps(idx))
    return src


def convert_hf_to_gguf(
    hf_dir: str | Path,
    out_path: str | Path,
    outtype: str = "f16",
    *,
    tree: Path | None = None,
    timeout: float = 900.0,
    extra_args: list[str] | None = None,
    fix_gpt2_n_ctx: bool = True,
    gpt2_output: bool = True,
) -> Path:
    """Convert an HF folder (config.json + safetensors + tokenizer files) to one GGUF file at out_path.

    Writes to a temp file beside out_path and renames it on success (atomic). Raises GGUFExportError on failure.
    With fix_gpt2_n_ctx, a GPT-2 folder without n_ctx is converted through a temp copy whose config.json gets
    n_ctx = n_positions (the weights are symlinked, not copied); the input folder is never modified.
    With gpt2_output, a tied GPT-2 gets an explicit output.weight (a copy of wte): the converter omits it and
    Ollama 0.5.4's older llama.cpp then fails with "missing tensor 'output.weight'" (current llama.cpp falls back
    to token_embd). Costs one more vocab x n_embd matrix in the file.
    """
    hf_dir, out_path = Path(hf_dir).resolve(), Path(out_path).resolve()
    if outtype not in OUTTYPES:
        raise GGUFExportError(f"outtype {outtype!r}: choose one of {OUTTYPES}")
    if not (hf_dir / "config.json").is_file():
        raise GGUFExportError(f"{hf_dir}: not an HF model folder (no config.json)")
    tree = tree or fetch_converter()
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp_prefix = f".{out_path.name}.convert-"
    with tempfile.TemporaryDirectory(prefix=tmp_prefix, suffix=".tmp", dir=out_path.parent) as tmp:
        src = _overlay(hf_dir, Path(tmp), fix_gpt2_n_ctx=fix_gpt2_n_ctx, gpt2_output=gpt2_output)
        tmp_out = Path(tmp) / "out.gguf"
        args = [str(src), "--outfile", str(tmp_out), "--outtype", outtype, *(extra_args or [])]
        proc = _run_converter(tree, args, tmp, timeout, hf_dir)
        if proc.returncode != 0 or not tmp_out.is_file():
            raise GGUFExportError(
                f"convert_hf_to_gguf {hf_dir} -> {outtype}: exit code {proc.returncode}"
                f"{_reason(proc.stderr, proc.stdout)}"
            )
        os.replace(tmp_out, out_path)
    faults.point("gguf_metadata_drift", out_path, inspect_gguf, rewrite_number)
    return faults.point("gguf_pretokenizer_mislabelled", out_path, rewrite_string)


def _run_converter(
    tree: Path, args: list[str], cwd: str, timeout: float, hf_dir: Path, script: str = "convert_hf_to_gguf.py"
) -> subprocess.CompletedProcess:
    """llama.cpp's converter (or its LoRA one) in a child: its own gguf-py first on the path, one BLAS thread,
    offline."""
    env = {k: v for k, v in os.environ.items() if k != "NO_LOCAL_GGUF"}
    env.update(
        PYTHONPATH=os.pathsep.join([str(tree / "gguf-py"), str(tree)]),
        OMP_NUM_THREADS="1",
        MKL_NUM_THREADS="1",
        OPENBLAS_NUM_THREADS="1",
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        TOKENIZERS_PARALLELISM="false",
    )
    cmd = [sys.executable, str(tree / script), *args]
    try:
        return run_guarded(cmd, timeout=timeout, env=env, cwd=cwd, name=script.removesuffix(".py"))
    except subprocess.TimeoutExpired as exc:
        raise GGUFExportError(
            f"{script.removesuffix('.py')} {hf_dir}: timed out after {timeout:.0f} s"
            f"{_reason(exc.stderr or '', exc.stdout or '')}"
        ) from None
