"""The child side of finetune.serve.llamacpp: `python -m finetune.serve.llamacpp_server REQUEST RESPONSE` starts
the llama.cpp server embedded in PyPI's xllamacpp on 127.0.0.1 at a free port with 1 thread, runs one request's
operation against it over HTTP, writes the JSON result and always stops the server. A crash inside llama.cpp
(e.g. std::out_of_range on a vocabulary mismatch) ends only this process; the parent reports its exit code.
"""

from __future__ import annotations

import json
import os
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finetune.system.procs import free_port


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
        speed = (r.get("timings") or {}).get("predicted_per_second")
        out.append({"text": r["content"], "tokens": r.get("tokens", []), "finish_reason": reason,
                    "tokens_per_second": speed})  # fmt: skip
    return out


def _op_logprobs(port: int, req: dict[str, Any]) -> list[list[tuple[float | None, list[tuple[int, float]]]]]:
    # Per prefix, the sampler is pushed onto a token whose probabilities the server reports (logit_bias only
    # touches the sampler; with post_sampling_probs off the top-k comes from the raw logits): when scoring, the
    # text's own next token, whose raw log-probability comes back beside the top-k; else the plain token for
    # "a" (the server drops the probabilities of a sampled byte-fallback piece and of a greedy EOS).
    forced = _post(port, "/tokenize", {"content": "a", "add_special": False})["tokens"][-1]
    out, score = [], bool(req.get("score"))
    for ids in req["texts"]:
        rows = []
        for i in range(1, len(ids) + (0 if score else 1)):  # cache_prompt: each step is one token of work
            body = {
                "prompt": ids[:i],
                "n_predict": 1,
                "n_probs": req["k"],
                "temperature": 0.0,
                "cache_prompt": True,
                "post_sampling_probs": False,
                "logit_bias": [[ids[i] if score else forced, 1000.0]],
            }
            probs = (_post(port, "/completion", body).get("completion_probabilities") or [{}])[0]
            top = [(int(t["id"]), float(t["logprob"])) for t in probs.get("top_logprobs", [])]
            rows.append((float(probs["logprob"]) if "logprob" in probs else None, top))
        out.append(rows)
    return out


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
            "usage: python -m finetune.serve.llamacpp_server REQUEST.json RESPONSE.json (run by run_child)",
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
