"""The real runtimes behind an evaluation: MLX (base, base + adapter, fused), llama.cpp and Ollama."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from finetune.evaluate import decode
from finetune.evaluate.evaluation import Backends
from finetune.evaluate.prompts import EvalPrompt
from finetune.gates.parity import Answer, ReferenceRows


class LoadedMlx:
    """The MLX runtimes of one evaluation, keeping the last model loaded from disk: base + adapter answers last
    and then scores the logprob reference, loaded once (3 s of SmolLM2's evaluate). One model at a time."""

    def __init__(self, load: Any = None):
        self.load = load or decode.load
        self.key: tuple[str, str | None] | None = None
        self.model: Any = None
        self.tokenizer: Any = None

    def get(self, model_dir: Path, adapter_dir: Path | None) -> tuple[Any, Any]:
        key = (str(model_dir), None if adapter_dir is None else str(adapter_dir))
        if key != self.key:
            self.close()
            self.model, self.tokenizer = self.load(model_dir, adapter_dir)
            self.key = key
        return self.model, self.tokenizer

    def generate(
        self, model_dir: Path, adapter_dir: Path | None, prompts: Sequence[str], max_tokens: int
    ) -> list[Answer]:
        model, tokenizer = self.get(model_dir, adapter_dir)
        return decode.greedy(model, tokenizer, prompts, max_tokens=max_tokens)

    def logprobs(
        self, model_dir: Path, adapter_dir: Path | None, requests: Sequence[tuple], k: int
    ) -> list[ReferenceRows]:
        model, _ = self.get(model_dir, adapter_dir)
        return [decode.reference_rows(model, ids, k, at, start) for ids, at, start in requests]

    def close(self) -> None:
        if self.model is not None:
            self.key = self.model = self.tokenizer = None
            decode.release(None)


def llamacpp_generate(
    gguf: Path, prompts: Sequence[str], max_tokens: int, stops: Sequence[str]
) -> list[Answer]:
    from finetune.serve import llamacpp

    return [
        Answer(g.text, g.finish_reason, list(g.tokens))
        for g in llamacpp.generate(gguf, prompts, max_tokens, stops)
    ]


def llamacpp_tokenize(gguf: Path, texts: Sequence[str]) -> list[list[int]]:
    from finetune.serve import llamacpp

    return llamacpp.tokenize(gguf, texts)


def llamacpp_logprobs(gguf: Path, token_ids: Sequence[int], k: int) -> list[dict[int, float]]:
    from finetune.serve import llamacpp

    return llamacpp.top_logprobs(gguf, token_ids, k=k)


def llamacpp_continuation(
    gguf: Path, prompt_ids: Sequence[int], n: int, k: int
) -> list[tuple[int, dict[int, float]]]:
    """llama.cpp's greedy continuation of a long prompt with its top-k logprobs; precise (f32 KV cache), so at a
    long context only the GGUF itself can differ from the reference (its f16 cache drifts 0.2 over 1024 tokens)."""
    from finetune.serve import llamacpp

    return llamacpp.continuation_logprobs(gguf, prompt_ids, n, k=k, n_ctx=len(prompt_ids) + n, precise=True)


def _field(r: Any, key: str) -> Any:
    return r.get(key) if isinstance(r, dict) else getattr(r, key, None)


def ollama_answers(server: Any, model: str, prompts: Sequence[EvalPrompt]) -> list[Answer]:
    """The conversation through the served TEMPLATE (/api/chat) as a user sends it: no options, so the
    Modelfile's PARAMETERs (temperature, num_predict, num_ctx, stop) decide. Each answer keeps the prompt
    the server rendered (from its debug log), to compare with training's token by token."""
    from finetune.serve.rendered import asked_and_rendered

    client, log = server.client(), getattr(server, "log_path", None)
    out = []
    for p in prompts:
        messages = [dict(m) for m in p.messages] or [{"role": "user", "content": p.question}]
        r, rendered = asked_and_rendered(log, lambda m=messages: client.chat(model=model, messages=m))
        reason = _field(r, "done_reason")
        text = _field(_field(r, "message"), "content") or ""
        # An unexpected done_reason (None: Ollama aborted, e.g. its repeat limit) is kept, so the clean-endings
        # gate shows it instead of hiding it.
        finish = reason if reason in ("stop", "length") else f"unknown:{reason}"
        out.append(Answer(text, finish, None, _field(r, "prompt_eval_count"), rendered))
    return out


def openai_answers(server: Any, model: str, messages: Sequence[dict], *, samples: int = 3) -> dict[str, Any]:
    """What /v1/chat/completions users get: `samples` requests as an OpenAI client sends them by default
    (model and messages only), then one with temperature 0; each with the prompt the server rendered."""
    import httpx

    from finetune.serve.rendered import asked_and_rendered

    url = f"{server.base_url}/v1/chat/completions"

    def post(body: dict[str, Any]) -> dict[str, Any]:
        r = httpx.post(url, json=body, timeout=getattr(server, "request_timeout", 120.0))
        r.raise_for_status()
        return r.json()["choices"][0]

    def ask(**extra: Any) -> dict[str, Any]:
        body = {"model": model, "messages": [dict(m) for m in messages], **extra}
        choice, rendered = asked_and_rendered(server.log_path, lambda: post(body))
        text = (choice.get("message") or {}).get("content") or ""
        return {"text": text, "finish": choice.get("finish_reason"), "rendered": rendered}

    return {"defaults": [ask() for _ in range(samples)], "greedy": ask(temperature=0)}


def real_backends() -> Backends:
    from finetune.models.tokenizer import load_tokenizer

    mlx = LoadedMlx()
    return Backends(
        load_tokenizer=load_tokenizer,
        mlx_generate=mlx.generate,
        mlx_logprobs=mlx.logprobs,
        llamacpp_generate=llamacpp_generate,
        llamacpp_tokenize=llamacpp_tokenize,
        llamacpp_logprobs=llamacpp_logprobs,
        llamacpp_continuation=llamacpp_continuation,
        close=mlx.close,
    )
