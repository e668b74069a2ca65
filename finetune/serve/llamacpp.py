"""llama.cpp as a runtime for an exported GGUF: tokenization, greedy generation and top-k logprobs.

llama.cpp runs in a child process (`python -m finetune.serve.llamacpp_server REQUEST RESPONSE`) with a timeout: a vocabulary
mismatch aborts the whole process (std::out_of_range in llama_vocab::byte_to_token). The child starts the
llama.cpp server embedded in PyPI's xllamacpp on 127.0.0.1 at a free port with 1 thread (2 threads collapsed
to <1 tok/s on the shared 2-core box), talks HTTP to it, writes JSON and always stops it.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.system.procs import run_guarded

Runner = Callable[..., subprocess.CompletedProcess]


class LlamaCppError(RuntimeError):
    """llama.cpp refused the file, crashed, or timed out; the message carries its exit code and stderr tail."""


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    # tokens include the EOS or stop-string tokens that ended generation; text leaves a stop string out
    tokens_per_second: float | None = None  # llama.cpp's own decode timing for this answer


def run_child(request: dict[str, Any], *, timeout: float = 180.0, runner: Runner = run_guarded) -> Any:
    """Run one llama.cpp request in a child process and return its JSON result, or raise LlamaCppError."""
    with tempfile.TemporaryDirectory(prefix="ft-llamacpp-") as tmp:
        req_path, resp_path = Path(tmp) / "request.json", Path(tmp) / "response.json"
        req_path.write_text(json.dumps(request), encoding="utf-8")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        pkg_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "finetune.serve.llamacpp_server", str(req_path), str(resp_path)]
        what = f"llama.cpp {request.get('op')} on {request.get('gguf')}"
        try:
            proc = runner(cmd, capture_output=True, text=True, timeout=timeout, env=env)
        except subprocess.TimeoutExpired as exc:
            raise LlamaCppError(f"{what}: timed out after {timeout:.0f} s{_tail(exc.stderr)}") from None
        if proc.returncode != 0:
            rc = proc.returncode
            sig = (
                f" ({signal.Signals(-rc).name})"
                if rc < 0 and -rc in signal.Signals._value2member_map_
                else ""
            )
            raise LlamaCppError(f"{what}: child exited with code {rc}{sig}{_tail(proc.stderr, proc.stdout)}")
        if not resp_path.is_file():
            raise LlamaCppError(f"{what}: child exited 0 without a response{_tail(proc.stderr)}")
        response = json.loads(resp_path.read_text(encoding="utf-8"))
    if "error" in response:
        raise LlamaCppError(f"{what}: {response['error']}{_tail(proc.stderr)}")
    return response["result"]


def _tail(*streams: Any, n: int = 12) -> str:
    """The lines worth reading from llama.cpp's chatty log: errors first, then the last few lines."""
    lines = []
    for s in streams:
        if isinstance(s, bytes):
            s = s.decode("utf-8", errors="replace")
        lines += (s or "").splitlines()
    keys = ("error", "abort", "terminate", "what()", "exception", "failed", "invalid")
    picked = [ln for ln in lines if any(k in ln.lower() for k in keys)][-n:] or lines[-n:]
    return ("\n  " + "\n  ".join(picked)) if picked else ""


def tokenize(
    gguf_path: str | Path,
    texts: Sequence[str],
    *,
    add_special: bool = True,
    timeout: float = 180.0,
    runner: Runner = run_guarded,
) -> list[list[int]]:
    """llama.cpp's token ids for each text (special tokens such as <|im_start|> are parsed, as HF does)."""
    req = {"op": "tokenize", "gguf": str(gguf_path), "texts": list(texts), "add_special": add_special}
    return run_child(req, timeout=timeout, runner=runner)


def generate(
    gguf_path: str | Path,
    prompts: Sequence[str | list[int]],
    max_tokens: int = 32,
    stop: Sequence[str] | None = None,
    *,
    n_ctx: int = 2048,
    precise: bool = False,
    timeout: float = 300.0,
    runner: Runner = run_guarded,
) -> list[Generation]:
    """Greedy (temperature 0) completions; a prompt is a string or a list of token ids (see top_logprobs
    for precise)."""
    req = {
        "op": "generate",
        "gguf": str(gguf_path),
        "prompts": list(prompts),
        "max_tokens": max_tokens,
        "stop": list(stop or []),
        "n_ctx": n_ctx,
        "precise": precise,
    }
    return [Generation(**g) for g in run_child(req, timeout=timeout, runner=runner)]


def top_logprobs(
    gguf_path: str | Path,
    token_ids: Sequence[int],
    *,
    k: int = 10,
    n_ctx: int = 2048,
    precise: bool = False,
    lora: str | Path | None = None,
    timeout: float = 300.0,
    runner: Runner = run_guarded,
) -> list[dict[int, float]]:
    """Row i: llama.cpp's k most likely next tokens after token_ids[: i + 1], as {id: log-probability}.

    The server reports log-softmax of the raw logits (n_probs with post_sampling_probs off), so these compare
    directly with a reference model's log_softmax(logits). precise=True turns off flash attention and keeps
    the KV cache in f32, so only the GGUF's weights can differ from the reference (llama.cpp's defaults,
    which Ollama also uses, round attention to f16).
    """
    req = {
        "op": "logprobs",
        "gguf": str(gguf_path),
        "texts": [[int(t) for t in token_ids]],
        "k": k,
        "n_ctx": n_ctx,
        "precise": precise,
        **({"lora": str(lora)} if lora else {}),  # a GGUF LoRA applied on gguf_path, at llama.cpp's scale 1
    }
    return [{int(t): lp for t, lp in row} for _, row in run_child(req, timeout=timeout, runner=runner)[0]]


def continuation_logprobs(
    gguf_path: str | Path,
    prompt_ids: Sequence[int],
    n: int,
    *,
    k: int = 20,
    n_ctx: int = 2048,
    precise: bool = False,
    timeout: float = 300.0,
    runner: Runner = run_guarded,
) -> list[tuple[int, dict[int, float]]]:
    """llama.cpp's greedy continuation of prompt_ids, n tokens (its end token ignored), in ONE request: per
    generated token, (its id, the k most likely tokens at that position as {id: log-probability} of the raw
    logits). The prompt is evaluated in batches: SmolLM2 with 960 + 64 tokens took 29 s here (precise, the
    other core busy), top_logprobs' one request per position 95 s for 1024 (see it for precise)."""
    req = {"op": "continue", "gguf": str(gguf_path), "ids": [int(t) for t in prompt_ids], "n": n, "k": k,
           "n_ctx": n_ctx, "precise": precise}  # fmt: skip
    return [
        (int(t), {int(i): lp for i, lp in row}) for t, row in run_child(req, timeout=timeout, runner=runner)
    ]


def scored_logprobs(
    gguf_path: str | Path,
    texts: Sequence[Sequence[int]],
    *,
    k: int = 32,
    n_ctx: int = 2048,
    timeout: float = 900.0,
    runner: Runner = run_guarded,
) -> list[list[tuple[float | None, dict[int, float]]]]:
    """Per text, row i for its token i + 1 after ids[: i + 1]: (that token's log-probability, the k most likely
    tokens as {id: log-probability}), with llama.cpp's defaults (what users run), one server for every text.
    The log-probability is None where the server reports none (a token that is not complete UTF-8 alone)."""
    req = {"op": "logprobs", "gguf": str(gguf_path), "texts": [[int(t) for t in ids] for ids in texts], "k": k,
           "n_ctx": n_ctx, "score": True}  # fmt: skip
    return [
        [(lp, {int(t): v for t, v in row}) for lp, row in rows]
        for rows in run_child(req, timeout=timeout, runner=runner)
    ]


logits = top_logprobs  # the name the pipeline brief uses; the values are log-probabilities
