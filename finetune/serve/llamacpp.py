"""llama.cpp as a runtime for an exported GGUF: tokenization, greedy generation and top-k logprobs.

llama.cpp runs in a child process (`python -m finetune.serve.llamacpp REQUEST RESPONSE`) with a timeout: a vocabulary
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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.system.procs import free_port, run_guarded

Runner = Callable[..., subprocess.CompletedProcess]


class LlamaCppError(RuntimeError):
    """llama.cpp refused the file, crashed, or timed out; the message carries its exit code and stderr tail."""


@dataclass(frozen=True)
class Generation:
    text: str
    tokens: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) or "length"
    # tokens include the EOS or stop-string tokens that ended generation; text leaves a stop string out


# --------------------------------------------------------------------------- parent side


def run_child(request: dict[str, Any], *, timeout: float = 180.0, runner: Runner = run_guarded) -> Any:
    """Run one llama.cpp request in a child process and return its JSON result, or raise LlamaCppError."""
    with tempfile.TemporaryDirectory(prefix="ft-llamacpp-") as tmp:
        req_path, resp_path = Path(tmp) / "request.json", Path(tmp) / "response.json"
        req_path.write_text(json.dumps(request), encoding="utf-8")
        env = dict(os.environ, OMP_NUM_THREADS="1")
        pkg_root = str(Path(__file__).resolve().parents[2])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
        cmd = [sys.executable, "-m", "finetune.serve.llamacpp", str(req_path), str(resp_path)]
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
        "ids": [int(t) for t in token_ids],
        "k": k,
        "n_ctx": n_ctx,
        "precise": precise,
        **({"lora": str(lora)} if lora else {}),  # a GGUF LoRA applied on gguf_path, at llama.cpp's scale 1
    }
    return [{int(t): lp for t, lp in row} for row in run_child(req, timeout=timeout, runner=runner)]


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


logits = top_logprobs  # the name the pipeline brief uses; the values are log-probabilities


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
    # precise: f32 KV cache, no flash attention, so only the GGUF's weights differ from a reference
    if req.get("precise"):
        params.cache_type_k = params.cache_type_v = xlc.ggml_type.GGML_TYPE_F32
        params.flash_attn_type = xlc.llama_flash_attn_type.LLAMA_FLASH_ATTN_TYPE_DISABLED
    if req.get("lora"):
        params.lora_adapters = [xlc.CommonAdapterLoraInfo(req["lora"], 1.0)]
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


def _op_continue(port: int, req: dict[str, Any]) -> list[tuple[int, list[tuple[int, float]]]]:
    body = {
        "prompt": req["ids"],
        "n_predict": req["n"],
        "n_probs": req["k"],
        "temperature": 0.0,
        "top_k": 1,
        "ignore_eos": True,
        "cache_prompt": False,
        "post_sampling_probs": False,
        "return_tokens": True,
        "seed": 0,
    }
    r = _post(port, "/completion", body)
    if "completion_probabilities" not in r:  # e.g. the context filled up before the first token
        raise RuntimeError(
            f"llama.cpp returned no probabilities (stop_type {r.get('stop_type')!r}, "
            f"{len(req['ids'])} prompt tokens + {req['n']}, n_ctx {req['n_ctx']})"
        )
    probs = r["completion_probabilities"]
    # one entry per generated token, each naming its token; a server that merged or dropped one is refused
    if [int(p["id"]) for p in probs] != [int(t) for t in r.get("tokens", [])]:
        raise RuntimeError(
            f"llama.cpp returned {len(probs)} probability rows for {len(r.get('tokens', []))} tokens"
        )
    return [(int(p["id"]), [(int(t["id"]), float(t["logprob"])) for t in p["top_logprobs"]]) for p in probs]


_OPS = {
    "tokenize": _op_tokenize,
    "generate": _op_generate,
    "logprobs": _op_logprobs,
    "continue": _op_continue,
}


def _child_main(argv: Sequence[str]) -> int:
    if len(argv) != 2:
        print(
            "usage: python -m finetune.serve.llamacpp REQUEST.json RESPONSE.json (run by run_child)",
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
