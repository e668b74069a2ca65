"""The one MLX decoder: greedy answers (batched), log-probabilities and teacher-forced loss of a model.

Every MLX measurement (the learning probe, the artifacts probe, tier 3's mlx runtimes, the logprob
reference for llama.cpp) goes through here, so they decode identically.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from finetune.gates.parity import Answer, ReferenceRows
from finetune.train.batches import TokenDataset, make_iterate_batches, masked_loss
from finetune.train.gemma_scale import exact_embed_scale


def load(model_dir: str | Path, adapter_dir: str | Path | None = None) -> tuple[Any, Any]:
    """base (+ adapter) from disk, in eval mode."""
    from mlx_lm import load as mlx_load

    model, tokenizer = mlx_load(str(model_dir), adapter_path=str(adapter_dir) if adapter_dir else None)
    exact_embed_scale(model)  # judge what llama.cpp and Ollama run (finetune.train.gemma_scale)
    model.eval()
    return model, tokenizer


def release(model: Any) -> None:
    del model
    mx.clear_cache()


def answers_from_disk(
    model_dir: Path, adapter_dir: Path | None, prompts: Sequence[str], max_tokens: int
) -> list[Answer]:
    """Greedy answers of model_dir (+ the saved adapter), loaded from disk and released after, whatever happens."""
    model, tokenizer = load(model_dir, adapter_dir)
    try:
        return greedy(model, tokenizer, prompts, max_tokens=max_tokens)
    finally:
        release(model)


def prompt_ids(tokenizer: Any, prompt: str) -> list[int]:
    """Token ids of a rendered prompt, with BOS added the way mlx-lm's generate adds it."""
    bos = getattr(tokenizer, "bos_token", None)
    return list(tokenizer.encode(prompt, add_special_tokens=bos is None or not prompt.startswith(bos)))


def cut_at_stops(text: str, stops: Sequence[str]) -> tuple[str, bool]:
    """(text before the first stop string, whether one was found)."""
    cut = min((text.index(s) for s in stops if s and s in text), default=None)
    return (text, False) if cut is None else (text[:cut], True)


def greedy(
    model: Any,
    tokenizer: Any,
    prompts: Sequence[str],
    *,
    max_tokens: int = 24,
    stops: Sequence[str] = (),
    batch_size: int = 32,
) -> list[Answer]:
    """Temperature-0 answers, `batch_size` prompts decoded together (mlx-lm's BatchGenerator; its default
    completion batch). Prefill dominates short answers: tier 3's 24 SmolLM2 prompts took 4.3 s in one batch,
    5.4 s in batches of 8, with the same answers.

    Generation ends at the tokenizer's EOS ids (the chat end token); text is cut at a stop string. tokens
    are the generated ids including the EOS that ended them.
    """
    from mlx_lm.generate import BatchGenerator

    model.eval()
    eos_ids = getattr(tokenizer, "eos_token_ids", None) or tokenizer.eos_token_id  # a set (mlx-lm) or an int
    eos = sorted([eos_ids] if isinstance(eos_ids, int) else eos_ids)
    stop_tokens = [[t] for t in eos]
    out: list[Answer] = []
    for start in range(0, len(prompts), max(1, batch_size)):
        chunk = [prompt_ids(tokenizer, p) for p in prompts[start : start + batch_size]]
        n = len(chunk)  # one batch each way: every prompt is prefilled and completed together
        gen = BatchGenerator(model, stop_tokens=stop_tokens, completion_batch_size=n, prefill_batch_size=n)
        uids = gen.insert(chunk, [max_tokens] * len(chunk))
        tokens: dict[int, list[int]] = {u: [] for u in uids}
        reasons: dict[int, str] = {}
        while responses := gen.next_generated():
            for r in responses:
                tokens[r.uid].append(int(r.token))
                if r.finish_reason is not None:
                    reasons[r.uid] = r.finish_reason
        gen.close()
        for uid, ids in zip(uids, chunk, strict=True):
            got = tokens[uid]
            content = got[:-1] if reasons.get(uid) == "stop" and got and got[-1] in eos else got
            text, stopped = cut_at_stops(tokenizer.decode(content), stops)
            reason = "stop" if stopped or reasons.get(uid) == "stop" else "length"
            out.append(Answer(text.strip(), reason, got, len(ids)))
    return out


def logprobs(model: Any, token_ids: Sequence[int]) -> np.ndarray:
    """log_softmax of the model's logits at every position of one sequence (positions x vocab), float32."""
    out = model(mx.array([list(token_ids)]))[0].astype(mx.float32)
    return np.array(out - mx.logsumexp(out, axis=-1, keepdims=True))


def logits_at(model: Any, token_ids: Sequence[int], start: int, n: int) -> mx.array:
    """The model's logits at positions start .. start + n - 1 of one sequence, the head run only there (through
    finetune.train.arch, which equals model(ids)): Gemma 3's 262k-vocabulary head over a 1024-token context
    costs more than its blocks, and the long-context reference reads 64 positions of it."""
    from finetune.train.arch import arch_of, run_blocks

    ids = mx.array([list(token_ids)])
    arch = arch_of(model)
    if arch is None or arch.check(model) is not None:
        return model(ids)[0, start : start + n]
    h = run_blocks(model, arch, arch.embed(model, ids), 0, len(arch.blocks(model)))
    return arch.head(model, arch.norm(model, h[0, start : start + n]))


def reference_rows(
    model: Any, token_ids: Sequence[int], k: int, at: Sequence[Sequence[int]], start: int = 0
) -> ReferenceRows:
    """The model's log-softmax at positions start, start + 1, ... (one per row of `at`): its top-k there and
    its values at the ids `at` names, without keeping positions x vocab rows on the host."""
    logits = logits_at(model, token_ids, start, len(at)).astype(mx.float32)
    lsm = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    top_ids = mx.argpartition(-lsm, kth=k - 1, axis=-1)[:, :k]
    width = max(1, *(len(a) for a in at))
    wanted = np.array([[*a, *([a[0] if a else 0] * (width - len(a)))] for a in at], dtype=np.int32)
    top_vals, at_vals = (
        mx.take_along_axis(lsm, top_ids, axis=-1),
        mx.take_along_axis(lsm, mx.array(wanted), axis=-1),
    )
    mx.eval(top_vals, at_vals)
    ti, tv, av = np.array(top_ids), np.array(top_vals, dtype=np.float64), np.array(at_vals, dtype=np.float64)
    tops = [
        dict(sorted(zip(map(int, i), map(float, v), strict=True), key=lambda x: -x[1]))
        for i, v in zip(ti, tv, strict=True)
    ]
    return ReferenceRows(
        tops,
        [{int(t): float(v) for t, v in zip(a, row, strict=False)} for a, row in zip(at, av, strict=True)],
    )


def text_nll(model: Any, tokenizer: Any, texts: Sequence[str]) -> float:
    """Mean negative log-likelihood per predicted token of plain texts (their perplexity is exp of it)."""
    total, count = 0.0, 0
    for text in texts:
        ids = list(tokenizer.encode(text))
        lp = logprobs(model, ids)
        total -= float(sum(lp[i, ids[i + 1]] for i in range(len(ids) - 1)))
        count += len(ids) - 1
    return total / count


def teacher_forced_loss(model: Any, dataset: TokenDataset, batch_size: int, max_seq_length: int) -> float:
    """Mean masked cross-entropy of the reference answers given their prompts."""
    model.eval()
    total, count = 0.0, 0.0
    for batch in make_iterate_batches(0)(dataset, batch_size, max_seq_length, loop=False):
        loss, ntoks = masked_loss(model, *batch)
        mx.eval(loss, ntoks)
        total += loss.item() * ntoks.item()
        count += ntoks.item()
    return total / count
