"""Inference tokens/s of one model three ways: MLX (HF folder), llama.cpp (GGUF f16) and Ollama (same GGUF).

All three decode greedily with one thread (MLX's OpenBLAS is single-threaded under FineTune's defaults,
llama.cpp gets n_threads=1, Ollama num_thread 1) and report decode speed only, excluding the prompt:
MLX's generation_tps, llama.cpp's timings.predicted_per_second, Ollama's eval_count / eval_duration.
Each engine runs in its own process: a warm-up generation, then `reps` timed ones; figures are medians.
The base model stands in for the fused one: fusing folds the adapter into the same weight shapes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import finetune  # noqa: F401  (loads OpenBLAS before any mlx import in this process)
from bench.stats import Figure, Section, median, ratio

PROMPT = (
    "<|im_start|>user\nWrite a long, detailed story about a robot who learns to paint, "
    "with many characters and places.<|im_end|>\n<|im_start|>assistant\n"
)


# ---------------------------------------------------------------- children


def mlx_child(model: str, prompt: str, max_tokens: int, reps: int) -> dict[str, Any]:
    import mlx.core as mx
    from mlx_lm import load, stream_generate
    from mlx_lm.sample_utils import make_sampler

    m, tok = load(model)
    eos = sorted(set(getattr(tok, "eos_token_ids", None) or [tok.eos_token_id]))

    def no_eos(_tokens, logits):  # decode exactly max_tokens, as llama.cpp's ignore_eos does
        return logits.at[:, eos].add(-mx.inf) if eos else logits

    out = []
    for _ in range(reps + 1):
        sampler = make_sampler(temp=0.0)
        *_, last = stream_generate(
            m, tok, prompt, max_tokens=max_tokens, sampler=sampler, logits_processors=[no_eos]
        )
        out.append(
            {"tps": last.generation_tps, "tokens": last.generation_tokens, "prompt_tps": last.prompt_tps}
        )
    return {"runs": out[1:], "warmup": out[0]}


def llamacpp_op(port: int, req: dict[str, Any]) -> list[dict[str, Any]]:
    from finetune.serve.llamacpp_server import _post

    out = []
    for _ in range(req["reps"] + 1):
        body = {
            "prompt": req["prompt"],
            "n_predict": req["max_tokens"],
            "temperature": 0.0,
            "top_k": 1,
            "cache_prompt": False,
            "ignore_eos": True,
            "seed": 0,
        }
        t = _post(port, "/completion", body)["timings"]
        out.append(
            {
                "tps": t["predicted_per_second"],
                "tokens": t["predicted_n"],
                "prompt_tps": t["prompt_per_second"],
            }
        )
    return out


def llamacpp_child(gguf: str, prompt: str, max_tokens: int, reps: int) -> dict[str, Any]:
    # Reuse the llama.cpp child's server start-up (1 thread, loopback port, health wait) with one more op.
    from finetune.serve import llamacpp_server as llamacpp

    llamacpp._OPS["speed"] = llamacpp_op
    req = {
        "op": "speed",
        "gguf": gguf,
        "prompt": prompt,
        "max_tokens": max_tokens,
        "reps": reps,
        "n_ctx": 2048,
    }
    out = llamacpp._serve(req)
    return {"runs": out[1:], "warmup": out[0]}


def run_child(kind: str, target: str, max_tokens: int, reps: int, timeout: float = 600) -> dict[str, Any]:
    cmd = [
        sys.executable,
        "-m",
        "bench.inference",
        kind,
        target,
        "--max-tokens",
        str(max_tokens),
        "--reps",
        str(reps),
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} child exited {proc.returncode}: {proc.stderr[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- Ollama (parent side)


def ollama_speed(gguf: Path, work: Path, max_tokens: int, reps: int) -> dict[str, Any]:
    """Serve the GGUF with a private Ollama server; None-free dict or raises with the reason."""
    from finetune.serve.ollama_provision import locate_ollama
    from finetune.serve.ollama_server import OllamaServer

    where = locate_ollama()
    if where.binary is None:
        return {"skipped": where.reason}
    run_dir = work / "ollama"
    run_dir.mkdir(parents=True, exist_ok=True)
    modelfile = run_dir / "Modelfile"
    modelfile.write_text(f"FROM {gguf.resolve()}\nPARAMETER temperature 0\nPARAMETER num_thread 1\n")
    with OllamaServer(where.binary, run_dir, request_timeout=300) as server:
        server.create_model("bench", modelfile)
        client = server.client()
        options = {"num_predict": max_tokens, "temperature": 0, "num_thread": 1, "seed": 0}
        out = []
        for _ in range(reps + 1):
            r = client.generate(model="bench", prompt=PROMPT, raw=True, options=options)
            decode_tps = r["eval_count"] / (r["eval_duration"] / 1e9)
            prompt_tps = r["prompt_eval_count"] / max(r["prompt_eval_duration"], 1) * 1e9
            out.append({"tps": decode_tps, "tokens": r["eval_count"], "prompt_tps": prompt_tps})
        return {"runs": out[1:], "warmup": out[0], "version": server.version, "binary": str(where.binary)}


# ---------------------------------------------------------------- the section


def summarize(model: str, results: dict[str, dict[str, Any]], max_tokens: int) -> Section:
    """results: engine -> {"runs": [{"tps", "tokens", "prompt_tps"}...]} or {"skipped"/"error": reason} (pure)."""
    s = Section("inference", f"Inference: {model}, greedy decode, 1 thread")
    labels = {
        "mlx": "MLX (float32 HF folder)",
        "llamacpp": "llama.cpp via xllamacpp (GGUF f16)",
        "ollama": "Ollama (same GGUF f16)",
    }
    tps: dict[str, float | None] = {}
    rows = []
    for key, label in labels.items():
        r = results.get(key, {"skipped": "not run"})
        runs = r.get("runs") or []
        tps[key] = median([x["tps"] for x in runs])
        why = r.get("skipped") or r.get("error") or ""
        toks = sorted({x["tokens"] for x in runs})
        detail = f"median of {len(runs)} runs of {toks} tokens" if runs else ""
        name = f"inference.{key}_tokens_per_s"
        s.add(Figure(name, f"{label} decode", tps[key], "tokens/s", detail=detail, reason=why))
        median_tps = f"{tps[key]:.1f}" if tps[key] else "—"
        each_run = ", ".join(f"{x['tps']:.1f}" for x in runs) or why
        prompt_tps = f"{median([x['prompt_tps'] for x in runs]):.0f}" if runs else "—"
        rows.append([label, median_tps, each_run, prompt_tps])
    mlx_over, ollama_over = ratio(tps["mlx"], tps["llamacpp"]), ratio(tps["ollama"], tps["llamacpp"])
    s.add(Figure("inference.mlx_over_llamacpp", "MLX / llama.cpp decode speed", mlx_over, "×"))
    s.add(Figure("inference.ollama_over_llamacpp", "Ollama / llama.cpp decode speed", ollama_over, "×"))
    s.table(["engine", "median tokens/s", "runs", "prompt tokens/s"], rows)
    s.notes += [
        f"Up to {max_tokens} new tokens after a ~30-token ChatML prompt; MLX and llama.cpp ignore EOS so every run "
        "decodes the full length, Ollama (no such option) stops at EOS if the model emits it.",
        "No goal is set for inference speed: these figures are for comparison only. MLX decodes the "
        "float32 weights (MLX's CPU backend has no fast float16 matmul); llama.cpp and Ollama use the f16 GGUF "
        "FineTune exports.",
    ]
    if "version" in results.get("ollama", {}):
        s.notes.append(f"Ollama {results['ollama']['version']} ({results['ollama']['binary']}).")
    s.data = results
    return s


def run_section(
    work: Path, model_path: Path, model: str, *, max_tokens: int = 64, reps: int = 3, log=print
) -> Section:
    from finetune.export.gguf import convert_hf_to_gguf

    work.mkdir(parents=True, exist_ok=True)
    gguf = work / "model-f16.gguf"
    tic = time.perf_counter()
    if not gguf.exists():
        convert_hf_to_gguf(model_path, gguf, "f16")
    export_s = time.perf_counter() - tic
    results: dict[str, dict[str, Any]] = {}
    jobs = {
        "mlx": lambda: run_child("mlx", str(model_path), max_tokens, reps),
        "llamacpp": lambda: run_child("llamacpp", str(gguf), max_tokens, reps),
        "ollama": lambda: ollama_speed(gguf, work, max_tokens, reps),
    }
    for key, job in jobs.items():
        try:
            results[key] = job()
        except Exception as exc:  # one engine failing must not hide the others' figures
            results[key] = {"error": f"{type(exc).__name__}: {str(exc)[-800:]}"}
        runs = results[key].get("runs") or []
        log(f"  inference {key}: {median([x['tps'] for x in runs]) if runs else results[key]}")
    s = summarize(model, results, max_tokens)
    s.data["gguf_export_s"] = round(export_s, 1)
    return s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description="inference speed child: mlx MODEL_DIR | llamacpp GGUF")
    p.add_argument("kind", choices=["mlx", "llamacpp"])
    p.add_argument("target")
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--prompt", default=PROMPT)
    a = p.parse_args(argv)
    child = mlx_child if a.kind == "mlx" else llamacpp_child
    print(json.dumps(child(a.target, a.prompt, a.max_tokens, a.reps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
