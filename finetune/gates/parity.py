"""Comparing runtimes: answers, token ids and log-probabilities of the same weights in different runtimes.

Pure functions over measurements; finetune.gates.runtime_parity turns them into verdicts.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str  # "stop" (end token or stop string) or "length" (hit max_tokens)
    tokens: list[int] | None = (
        None  # generated ids, the ending token included; None when the runtime hides them
    )
    prompt_tokens: int | None = None
    rendered: str | None = None  # the prompt text the runtime built from its own template (Ollama)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def agrees(got: Any, want: Any, ref: Answer) -> bool:
    """The same answer (text or token ids); where the reference ran to its token budget, one that starts with
    it: a served model's own num_predict may let it run on further, as users get it."""
    return got == want or (ref.finish_reason != "stop" and got[: len(want)] == want)


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


@dataclass(frozen=True)
class ReferenceRows:
    """Per position, what a logprob comparison needs of the reference's log-softmax: its own top-k, and its
    values at the candidate's tokens (a full positions x vocab array is 1 GiB per 1024 positions of a 262k vocab)."""

    top: list[dict[int, float]]
    at: list[dict[int, float]]

    @classmethod
    def from_full(cls, rows: Any, candidate: Sequence[dict[int, float]], k: int) -> ReferenceRows:
        rows = np.asarray(rows, dtype=np.float64)
        tops = [{int(t): float(r[t]) for t in np.argsort(-r)[:k]} for r in rows]
        return cls(tops, [{t: float(r[t]) for t in c} for r, c in zip(rows, candidate, strict=False)])

    def __len__(self) -> int:
        return len(self.top)


def logprob_parity(
    reference: Any,
    candidate: Sequence[dict[int, float]],
    *,
    max_abs: float,
    min_top1: float = 1.0,
    tie_margin: float | None = None,
    ref_k: int = 5,
) -> ParityResult:
    """llama.cpp's top-k logprobs vs the reference's (ReferenceRows, or positions x vocab rows), both ways: each
    token llama.cpp lists within max_abs of the reference; each of the reference's top ref_k listed within
    max_abs, or at most max_abs above llama.cpp's last listed logprob. Top-1 must agree on min_top1 of positions,
    where a flip inside a near-tie (reference gap <= tie_margin, default max_abs) agrees."""
    tie_margin = max_abs if tie_margin is None else tie_margin
    if not isinstance(reference, ReferenceRows):
        full = np.asarray(reference)
        reference = (
            ReferenceRows.from_full(full, candidate, ref_k) if full.ndim == 2 else ReferenceRows([], [])
        )
    if len(reference) != len(candidate) or not candidate:
        return ParityResult(
            False, [f"shape mismatch: reference {len(reference)} rows, llama.cpp {len(candidate)}"]
        )
    worst, worst_at, strict, tolerant, missed, diffs = 0.0, (0, 0), 0, 0, 0, []
    for pos, (ref_top, ref_at, top) in enumerate(zip(reference.top, reference.at, candidate, strict=True)):
        if not top:
            return ParityResult(False, [f"position {pos}: llama.cpp returned no logprobs"])
        floor = min(top.values())
        # llama.cpp's own list, then the reference's top tokens it left out (a lower bound of their error)
        pairs = [(t, abs(ref_at[t] - lp)) for t, lp in top.items()]
        unlisted = [(t, lp - floor) for t, lp in list(ref_top.items())[:ref_k] if t not in top]
        missed += sum(1 for _, d in unlisted if d > max_abs)
        for tid, d in pairs + [(t, max(d, 0.0)) for t, d in unlisted]:
            diffs.append(float(d))
            if d > worst:
                worst, worst_at = float(d), (pos, tid)
        cpp_top1, ref_best = max(top, key=top.get), max(ref_top.values())
        strict += int(cpp_top1 == max(ref_top, key=ref_top.get))
        tolerant += int(ref_at[cpp_top1] >= ref_best - tie_margin)
    n = len(candidate)
    metrics = {
        "max_abs_diff": worst,
        "median_abs_diff": float(np.median(diffs)),
        "top1_agreement": strict / n,
        "top1_agreement_tol": tolerant / n,
        "positions": float(n),
        "reference_top_missed": float(missed),
    }
    problems = []
    if worst > max_abs:
        problems.append(
            f"max |logprob diff| {worst:.3g} > {max_abs:g} (position {worst_at[0]}, token {worst_at[1]})"
        )
    if missed:
        problems.append(f"{missed} of the reference's top-{ref_k} tokens are missing from llama.cpp's top-k")
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


def content_tokens(tokens: Sequence[int], end_ids: Collection[int]) -> list[int]:
    """Generated ids up to (not including) the first end token: runtimes differ in reporting the end token."""
    out = []
    for t in tokens:
        if t in end_ids:
            break
        out.append(int(t))
    return out
