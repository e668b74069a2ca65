"""Quantizing a GGUF with the quantizer users have: Ollama's `create --quantize` (llama.cpp's llama_model_quantize
inside Ollama), in a private server whose store is a temporary folder; the quantized model layer is the GGUF.

The same server then decodes a few tokens from the model it made, so the shipped file's speed in Ollama is
measured where it was produced (eval_count / eval_duration of a greedy generate).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune import faults
from finetune.serve.ollama_server import OllamaServer

MODEL_LAYER = "application/vnd.ollama.image.model"
NAME = "quantized"
SPEED_PROMPT = "Once upon a time"
SPEED_TOKENS = 48


@dataclass(frozen=True)
class Quantized:
    path: Path
    seconds: float
    ollama_tokens_per_second: float | None


def model_blob(store: Path, name: str) -> Path:
    """The model layer's blob of NAME:latest in an Ollama store (OLLAMA_MODELS)."""
    manifest = store / "manifests" / "registry.ollama.ai" / "library" / name / "latest"
    layers = json.loads(manifest.read_text())["layers"]
    digest = next(x["digest"] for x in layers if x["mediaType"] == MODEL_LAYER)
    return store / "blobs" / digest.replace(":", "-")


def quantize_gguf(
    source: Path,
    out_path: Path,
    qtype: str,
    *,
    binary: Path,
    server: Callable[..., Any] = OllamaServer,
    timeout: float = 900.0,
    speed: bool = True,
) -> Quantized:
    """`ollama create --quantize QTYPE` from an f16/f32 GGUF -> out_path (atomic); OllamaServer.create_model's
    OllamaCommandError names why not (a type this Ollama does not know, a source it cannot quantize). speed:
    decode a few tokens there too (off when other work runs beside: served_speed measures it later)."""
    import time

    out_path = Path(out_path).resolve()
    asked = faults.point("quant_wrong_type", qtype)
    with tempfile.TemporaryDirectory(prefix=f".{out_path.name}.", suffix=".tmp", dir=out_path.parent) as tmp:
        modelfile = Path(tmp) / "Modelfile"
        modelfile.write_text(f"FROM {Path(source).resolve()}\n")
        with server(binary, tmp) as srv:
            start = time.monotonic()
            srv.create_model(NAME, modelfile, timeout=timeout, quantize=asked)
            seconds = time.monotonic() - start
            tokens_per_second = decode_speed(srv.client(), NAME) if speed else None
        os.replace(model_blob(Path(tmp) / "models", NAME), out_path)
    faults.point("quant_tensor_damaged", out_path)
    return Quantized(out_path, seconds, tokens_per_second)


def served_speed(
    gguf: Path, *, binary: Path, server: Callable[..., Any] = OllamaServer, timeout: float = 600.0
) -> float | None:
    """Ollama's decode tokens/s for a GGUF, served as users serve it (FROM the file), in a private server whose
    store is a temporary folder beside it."""
    gguf = Path(gguf).resolve()
    with tempfile.TemporaryDirectory(prefix=f".{gguf.name}.speed.", suffix=".tmp", dir=gguf.parent) as tmp:
        modelfile = Path(tmp) / "Modelfile"
        modelfile.write_text(f"FROM {gguf}\n")
        with server(binary, tmp) as srv:
            srv.create_model(NAME, modelfile, timeout=timeout)
            return decode_speed(srv.client(), NAME)


def decode_speed(client: Any, model: str) -> float | None:
    """Ollama's decode tokens/s for a greedy continuation (None when it generated nothing)."""
    r = client.generate(
        model=model, prompt=SPEED_PROMPT, raw=True, options={"num_predict": SPEED_TOKENS, "temperature": 0}
    )
    count, ns = r.get("eval_count") or 0, r.get("eval_duration") or 0
    return count / (ns / 1e9) if count and ns else None
