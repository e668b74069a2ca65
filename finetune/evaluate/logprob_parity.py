"""Logprob parity, measured: llama.cpp and MLX (base + SAVED adapter) score the same token ids.

Two parts, each kept by the content of what it measured (logprob_cache):
  short  the fine-tuned model's own short answers (prompt + mlx_fused's answer), position by position, with
         llama.cpp as Ollama runs it;
  long   a long context of the run's own rows that llama.cpp continues (precise: f32 KV cache), MLX scoring
         the positions it continued.
llama.cpp's side runs in the evaluation's worker thread: the long continuation first (it needs nothing the
runtimes answer), the short answers once mlx_fused has answered. MLX's side runs in the caller's thread after
the MLX runtimes, with the model mlx_adapter loaded. The reference is base + adapter, not the fused folder,
which would share a fault of the fused config.json.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from typing import Any

from finetune.evaluate import logprob_cache
from finetune.evaluate.prompts import long_context_text
from finetune.gates.parity import ReferenceRows


class LogprobParity:
    def __init__(self, inputs: Any, tokenizer: Any):
        s = self.settings = inputs.settings
        self.inputs, self.tokenizer = inputs, tokenizer
        length = s.long_context
        if inputs.model_context:  # llama.cpp stops one token short of a full context
            length = min(length, inputs.model_context - 1)
        text = long_context_text(inputs.data_dir, 8 * length)  # >= 1 token per 8 characters
        self.prompt = list(tokenizer.encode(text))[: length - s.long_positions]
        self.files = logprob_cache.files_key(inputs)  # hashed once for both parts
        self.long_cache = logprob_cache.Cache(inputs.cache_dir, self.files, inputs, [], self.prompt)
        self.long_kept = self.long_cache.load()
        self.continuation: Future = Future()  # llama.cpp's continuation of the long context
        self.short: Future = Future()  # (sequences, their cache, what it kept, llama.cpp's rows)
        self.fused_answered = threading.Event()  # set by the caller once mlx_fused has answered (or failed)

    def llamacpp_long(self, backends: Any) -> None:
        """Worker thread, first."""
        if self.long_kept is None:
            s = self.settings
            _settle(self.continuation, lambda: backends.llamacpp_continuation(
                self.inputs.gguf, self.prompt, s.long_positions, s.top_k))  # fmt: skip

    def llamacpp_short(self, m: Any, backends: Any) -> None:
        """Worker thread, after its own answers: llama.cpp's rows for the fused model's short answers."""
        self.fused_answered.wait()

        def measure() -> tuple:
            s = self.settings
            pairs = list(zip(m.prompts, m.answers["mlx_fused"], strict=True))[: s.logprob_prompts]
            seqs = [list(self.tokenizer.encode(p.prompt + a.text))[: s.short_depth] for p, a in pairs]
            ids = [t for seq in seqs for t in [*seq, -1]]  # the cache key: every sequence, each ended by -1
            cache = logprob_cache.Cache(self.inputs.cache_dir, self.files, self.inputs, ids, [])
            kept = cache.load()
            rows = [] if kept else [backends.llamacpp_logprobs(self.inputs.gguf, q, s.top_k) for q in seqs]
            return seqs, cache, kept, rows

        _settle(self.short, measure)

    def measure(self, m: Any, backends: Any, log: Callable[[str], None]) -> None:
        """Caller's thread, after the MLX runtimes: MLX scores what llama.cpp measured; into m."""
        inputs, s = self.inputs, self.settings
        log(
            "[evaluate] logprob parity (llama.cpp vs MLX base + adapter, short answers and a long context) ..."
        )

        def score(requests: list[tuple]) -> list[ReferenceRows]:
            return backends.mlx_logprobs(inputs.base_dir, inputs.adapter_dir, requests, s.ref_top_k)

        try:
            long = self.long_kept
            if long is None:
                cont = self.continuation.result()
                seq = self.prompt + [t for t, _ in cont]
                (ref,) = score([(seq, [list(c) for _, c in cont], len(self.prompt) - 1)])
                long = (ref, [c for _, c in cont], {"context": len(seq), "positions": len(cont)})
                self.long_cache.save(*long)
            seqs, cache, short, rows = self.short.result()
            if short is None:
                refs = score([(q, [list(c) for c in got], 0) for q, got in zip(seqs, rows, strict=True)])
                short = (_joined(refs), [c for got in rows for c in got], {})
                cache.save(*short)
            m.logprob_reference = _joined([short[0], long[0]])
            m.logprob_candidate = short[1] + long[1]
            m.logprob_long = long[2]
            if self.long_kept is not None and not rows and cache.path is not None:
                log("[evaluate] logprob parity: measured before on these exact files (content hashes)")
        except Exception as exc:
            m.logprob_error = f"{type(exc).__name__}: {exc}"


def _settle(future: Future, fn: Callable[[], Any]) -> None:
    try:
        future.set_result(fn())
    except Exception as exc:  # LogprobParity.measure records it
        future.set_exception(exc)


def _joined(rows: Sequence[ReferenceRows]) -> ReferenceRows:
    return ReferenceRows([t for r in rows for t in r.top], [a for r in rows for a in r.at])
