"""llama.cpp checks of an exported GGUF: tokenization, greedy generation and top-k logprobs, plus parity gates.

llama.cpp runs in a child process (`python -m finetune.llamacpp REQUEST RESPONSE`) with a timeout: a vocabulary
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
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finetune.ollama_server import free_port

SAMPLE_TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Unicode: héllo wörld, naïve café, Ελληνικά, русский, 日本語, 🚀🦙 emoji.",
    "Digits 0 12 345 6789 3.14159 1,000,000 and 2026-11-22.",
    "def add(a, b):\n    return a + b  # code\n\tindented\n\n",
    "<|im_start|>system\nYou are helpful.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "   leading spaces, trailing spaces   ",
    # Unicode numbers: llama.cpp's "smollm" pre-tokenizer splits every \p{N}; an HF tokenizer rebuilt from
    # a GGUF by transformers lost SmolLM2's Digits step and merges " ½" differently.
    "Fractions ½ ¼, powers x² y³, circled ① and Roman Ⅻ.",
]
Runner = Callable[..., subprocess.CompletedProcess]
# logprob_parity settings per GGUF outtype, measured on SmolLM2-135M (f32 MLX reference, which is within 2.4e-4
# of a float64 torch run; top-10 logprobs over 80 positions). llama.cpp defaults: f32 max 0.022 (median 0.002),
# f16 max 0.041 (median 0.004), q8_0 max 0.81 (median 0.13; the shipped Q4_1 file with the very same weights
# drifts as much, so that is llama.cpp's quantized matmul, not the export). With precise=True an f32 GGUF
# agrees to 4.8e-5 (2.4e-3 on the random init-0.1 test Llama, where MLX stays within 8e-6 of float64; a wrong
# Q/K layout moves logprobs by ~3). tie_margin: a top-1 that trails the reference's by less is a near-tie.
LOGPROB_TOLERANCE: dict[str, dict[str, float]] = {
    "f32_precise": {"max_abs": 5e-3, "tie_margin": 5e-3},
    "f32": {"max_abs": 0.06, "tie_margin": 0.03},
    "f16": {"max_abs": 0.1, "tie_margin": 0.05},
    "q8_0": {"max_abs": 1.5, "tie_margin": 0.3},
}


class LlamaCppError(RuntimeError):
    """llama.cpp refused the file, crashed, or timed out; the message carries its exit code and stderr tail."""


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    # tokens include the EOS or stop-string tokens that ended generation; text leaves a stop string out


# --------------------------------------------------------------------------- parent side


def run_child(request: dict[str, Any], *, timeout: float = 180.0, runner: Runner = subprocess.run) -> Any:
    """Run one llama.cpp request in a child process and return its JSON result, or raise LlamaCppError."""
    with tempfile.TemporaryDirectory(prefix="ft-llamacpp-") as tmp:
        req_path, resp_path = Path(tmp) / "request.json", Path(tmp) / "response.json"
        req_path.write_text(json.dumps(request), encoding="utf-8")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        pkg_root = str(Path(__file__).resolve().parent.parent)
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "finetune.llamacpp", str(req_path), str(resp_path)]
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
    runner: Runner = subprocess.run,
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
    runner: Runner = subprocess.run,
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
    timeout: float = 300.0,
    runner: Runner = subprocess.run,
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
        "ids": [int(t) for t in token_ids],
        "k": k,
        "n_ctx": n_ctx,
        "precise": precise,
    }
    return [{int(t): lp for t, lp in row} for row in run_child(req, timeout=timeout, runner=runner)]


logits = top_logprobs  # the name the pipeline brief uses; the values are log-probabilities


# --------------------------------------------------------------------------- parity gates (pure)


@dataclass(frozen=True)
class ParityResult:
    ok: bool
    problems: list[str]
    metrics: dict[str, float] = field(default_factory=dict)


def tokenizer_parity(
    texts: Sequence[str], reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]] | Exception
) -> ParityResult:
    """Every text must tokenize to exactly the reference (HF) ids; a llama.cpp crash is a failure, not a hang."""
    if isinstance(candidate, Exception):
        return ParityResult(False, [f"llama.cpp could not tokenize: {candidate}"], {"match_rate": 0.0})
    problems = []
    for text, ref, got in zip(texts, reference, candidate, strict=True):
        if list(ref) != list(got):
            at = next(
                (i for i, (a, b) in enumerate(zip(ref, got, strict=False)) if a != b), min(len(ref), len(got))
            )
            problems.append(
                f"{text[:40]!r}: HF {list(ref)[at : at + 5]} vs llama.cpp {list(got)[at : at + 5]} "
                f"at token {at} (lengths {len(ref)}/{len(got)})"
            )
    rate = 1.0 - len(problems) / max(1, len(texts))
    return ParityResult(not problems, problems, {"match_rate": rate, "texts": float(len(texts))})


def logprob_parity(
    reference: np.ndarray,
    candidate: Sequence[dict[int, float]],
    *,
    max_abs: float,
    min_top1: float = 1.0,
    tie_margin: float | None = None,
) -> ParityResult:
    """Compare llama.cpp's top-k logprobs with the reference's full log-softmax rows (positions x vocab).

    Fails when any compared logprob differs by more than max_abs, or when llama.cpp's top-1 is not the
    reference's top-1 at more than 1 - min_top1 of positions. A top-1 that differs only inside a near-tie
    (reference gap <= tie_margin, default max_abs) counts as agreeing: either answer is within tolerance.
    """
    tie_margin = max_abs if tie_margin is None else tie_margin
    reference = np.asarray(reference, dtype=np.float64)
    if reference.ndim != 2 or len(reference) != len(candidate):
        return ParityResult(
            False, [f"shape mismatch: reference {reference.shape}, llama.cpp {len(candidate)} rows"]
        )
    worst, worst_at, strict, tolerant, diffs = 0.0, (0, 0), 0, 0, []
    for pos, (ref, top) in enumerate(zip(reference, candidate, strict=True)):
        if not top:
            return ParityResult(False, [f"position {pos}: llama.cpp returned no logprobs"])
        for tid, lp in top.items():
            diffs.append(float(abs(ref[tid] - lp)))
            if diffs[-1] > worst:
                worst, worst_at = diffs[-1], (pos, tid)
        cpp_top1 = max(top, key=top.get)
        strict += int(cpp_top1 == int(np.argmax(ref)))
        tolerant += int(ref[cpp_top1] >= ref.max() - tie_margin)
    n = len(candidate)
    metrics = {
        "max_abs_diff": worst,
        "median_abs_diff": float(np.median(diffs)),
        "top1_agreement": strict / n,
        "top1_agreement_tol": tolerant / n,
        "positions": float(n),
    }
    problems = []
    if worst > max_abs:
        problems.append(
            f"max |logprob diff| {worst:.3g} > {max_abs:g} (position {worst_at[0]}, token {worst_at[1]})"
        )
    if tolerant / n < min_top1:
        problems.append(
            f"top-1 agreement {tolerant / n:.1%} < {min_top1:.0%} ({n - tolerant} of {n} positions)"
        )
    return ParityResult(not problems, problems, metrics)


def greedy_parity(
    reference: Sequence[Sequence[int]], candidate: Sequence[Sequence[int]], *, min_match: float = 1.0
) -> ParityResult:
    """Greedy continuations must be identical token for token for at least min_match of the prompts."""
    problems, same = [], 0
    for i, (ref, got) in enumerate(zip(reference, candidate, strict=True)):
        n = min(len(ref), len(got))
        at = next((j for j in range(n) if ref[j] != got[j]), None if len(ref) == len(got) else n)
        if at is None:
            same += 1
        else:
            problems.append(
                f"prompt {i}: greedy tokens diverge at step {at} ({list(ref)[at : at + 3]} vs "
                f"{list(got)[at : at + 3]})"
            )
    rate = same / max(1, len(reference))
    ok = rate >= min_match
    return ParityResult(ok, [] if ok else problems, {"greedy_match_rate": rate})


# --------------------------------------------------------------------------- reference side (MLX)


class MlxReference:
    """mlx_lm on the HF folder: the model the GGUF was exported from, as the parity reference."""

    def __init__(self, hf_dir: str | Path):
        import mlx_lm

        self.model, self.tokenizer = mlx_lm.load(str(hf_dir))

    def logprobs(self, token_ids: Sequence[int]) -> np.ndarray:
        import mlx.core as mx

        out = self.model(mx.array([list(token_ids)]))[0].astype(mx.float32)
        return np.array(out - mx.logsumexp(out, axis=-1, keepdims=True))

    def greedy(self, token_ids: Sequence[int], max_tokens: int, stop_ids: Sequence[int] = ()) -> list[int]:
        ids, out = list(token_ids), []
        for _ in range(max_tokens):  # full recompute: exact and cheap for short checks
            nxt = int(np.argmax(self.logprobs(ids)[-1]))
            out.append(nxt)
            if nxt in stop_ids:
                break
            ids.append(nxt)
        return out


# --------------------------------------------------------------------------- child side


def _post(port: int, path: str, body: dict[str, Any], timeout: float = 120.0) -> Any:
    req = urllib.request.Request(
        f"http://127.0.0.1:{port}{path}",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            return json.loads(resp.read())
    except urllib.error.HTTPError as exc:
        raise RuntimeError(
            f"POST {path}: HTTP {exc.code}: {exc.read().decode(errors='replace')[:500]}"
        ) from None


def _serve(req: dict[str, Any]) -> Any:
    import xllamacpp as xlc

    port = free_port()
    params = xlc.CommonParams()
    params.model.path = req["gguf"]
    params.n_ctx = int(req.get("n_ctx", 2048))
    params.n_parallel = 1
    params.n_gpu_layers = 0
    params.cpuparams.n_threads = params.cpuparams_batch.n_threads = 1
    params.warmup = False
    if (
        req.get("kv_cache", "f16") != "f16"
    ):  # f16 is llama.cpp's (and Ollama's) default; f32 isolates weight error
        params.cache_type_k = params.cache_type_v = getattr(
            xlc.ggml_type, f"GGML_TYPE_{req['kv_cache'].upper()}"
        )
    params.hostnames = ["127.0.0.1"]
    params.port = port
    server = xlc.Server(params)  # raises if the model does not load
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as r:
                    if r.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError):
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"llama.cpp server on port {port} not healthy after 60 s")
            time.sleep(0.1)
        return _OPS[req["op"]](port, req)
    finally:
        del server


def _op_tokenize(port: int, req: dict[str, Any]) -> list[list[int]]:
    body = {"add_special": req["add_special"], "parse_special": True}
    return [_post(port, "/tokenize", {**body, "content": t})["tokens"] for t in req["texts"]]


def _op_generate(port: int, req: dict[str, Any]) -> list[dict[str, Any]]:
    out = []
    for prompt in req["prompts"]:
        r = _post(
            port,
            "/completion",
            {
                "prompt": prompt,
                "n_predict": req["max_tokens"],
                "temperature": 0.0,
                "top_k": 1,
                "stop": req["stop"],
                "cache_prompt": False,
                "return_tokens": True,
                "seed": 0,
            },
        )
        reason = "length" if r.get("stop_type") == "limit" else "stop"
        out.append({"text": r["content"], "tokens": r.get("tokens", []), "finish_reason": reason})
    return out


def _op_logprobs(port: int, req: dict[str, Any]) -> list[list[tuple[int, float]]]:
    # The server drops the probabilities of a sampled token that is not complete UTF-8 (a byte-fallback piece)
    # and of a greedy EOS, so the sampler is pushed onto the plain token for "a". logit_bias only touches the
    # sampler: with post_sampling_probs off the reported top-k comes from the raw logits.
    forced = _post(port, "/tokenize", {"content": "a", "add_special": False})["tokens"][-1]
    rows, ids = [], req["ids"]
    for i in range(1, len(ids) + 1):  # prefix by prefix; cache_prompt makes each step one token of work
        body = {
            "prompt": ids[:i],
            "n_predict": 1,
            "n_probs": req["k"],
            "temperature": 0.0,
            "cache_prompt": True,
            "post_sampling_probs": False,
            "logit_bias": [[forced, 1000.0]],
        }
        top = _post(port, "/completion", body)["completion_probabilities"][0]["top_logprobs"]
        rows.append([(int(t["id"]), float(t["logprob"])) for t in top])
    return rows


_OPS = {"tokenize": _op_tokenize, "generate": _op_generate, "logprobs": _op_logprobs}


def _child_main(argv: Sequence[str]) -> int:
    if len(argv) != 2:
        print(
            "usage: python -m finetune.llamacpp REQUEST.json RESPONSE.json (run by run_child)",
            file=sys.stderr,
        )
        return 2
    req_path, resp_path = Path(argv[0]), Path(argv[1])
    req = json.loads(req_path.read_text(encoding="utf-8"))
    try:
        response: dict[str, Any] = {"result": _serve(req)}
    except Exception as exc:  # reported to the parent as JSON; crashes inside llama.cpp surface as exit codes
        response = {"error": f"{type(exc).__name__}: {exc}"}
    tmp = resp_path.with_suffix(".tmp")
    tmp.write_text(json.dumps(response), encoding="utf-8")
    os.replace(tmp, resp_path)
    return 0


if __name__ == "__main__":
    sys.exit(_child_main(sys.argv[1:]))
