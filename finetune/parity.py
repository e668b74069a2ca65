"""Tier 3 gates over the answers of several runtimes. Pure functions: measurements in, Verdict out.

Runtimes: the MLX base model (for comparison), and the fine-tuned model as (a) MLX base + adapter,
(b) the fused MLX folder, (c) the GGUF in llama.cpp, (d) the GGUF served by Ollama.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import asdict, dataclass
from typing import Any

from finetune.llamacpp import ParityResult
from finetune.llamacpp import tokenizer_parity as _tokenizer_parity
from finetune.validate import Verdict, answer_score

# Greedy decoding of the same weights should agree almost everywhere; f16 GGUF rounding may flip a rare
# near-tie (measured: identical on every prompt tried), so one prompt in ten may differ.
TEXT_AGREEMENT = 0.9
# The fine-tuned model must answer differently from the base on at least half the training questions
# and contain the trained answer on at least half (a lost LoRA scale or a fuse that drops the adapter
# gives base answers: ~0 changed, ~0 right).
MIN_CHANGED = 0.5
MIN_TRAIN_SCORE = 0.5
# Chat-control tokens of the formats we deploy; an answer showing one did not stop where it should.
SPECIAL_TOKEN = re.compile(r"<\|[A-Za-z0-9_]+\|>|</s>|<s>|\[/?INST\]|### Instruction:")


@dataclass(frozen=True)
class Answer:
    text: str
    finish_reason: str  # "stop" (end token or stop string) or "length" (hit max_tokens)
    tokens: list[int] | None = (
        None  # generated ids, the ending token included; None when the runtime hides them
    )
    prompt_tokens: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def content_tokens(tokens: Sequence[int], end_ids: Collection[int]) -> list[int]:
    """Generated ids up to (not including) the first end token: runtimes differ in reporting the end token."""
    out = []
    for t in tokens:
        if t in end_ids:
            break
        out.append(int(t))
    return out


def _rate(flags: Sequence[bool]) -> float:
    return sum(flags) / len(flags) if flags else 0.0


def output_parity(
    answers: Mapping[str, Sequence[Answer]],
    *,
    reference: str,
    thresholds: Mapping[str, float],
    end_ids: Collection[int] = (),
    errors: Mapping[str, str] | None = None,
) -> Verdict:
    """Each runtime in `thresholds` must give the reference runtime's greedy text (and tokens, where both
    report them) on at least its threshold share of prompts. A runtime that failed to answer fails the gate."""
    name = "output_parity"
    errors = dict(errors or {})
    problems, rates = [], {}
    ref = answers.get(reference)
    if ref is None:
        return Verdict(name, False, None, None, f"no answers from the reference runtime {reference!r}")
    for runtime, threshold in thresholds.items():
        if runtime in errors:
            problems.append(f"{runtime}: no answers ({errors[runtime]})")
            continue
        got = answers.get(runtime)
        if got is None or len(got) != len(ref):
            problems.append(f"{runtime}: {0 if got is None else len(got)} answers for {len(ref)} prompts")
            continue
        same_text = [a.text.strip() == r.text.strip() for a, r in zip(got, ref, strict=True)]
        rate = {"text": _rate(same_text)}
        if all(a.tokens is not None for a in got) and all(r.tokens is not None for r in ref):
            rate["tokens"] = _rate(
                [
                    content_tokens(a.tokens, end_ids) == content_tokens(r.tokens, end_ids)
                    for a, r in zip(got, ref, strict=True)
                ]
            )
        rates[runtime] = rate
        worst = min(rate.values())
        if worst < threshold:
            i = same_text.index(False) if False in same_text else 0
            problems.append(
                f"{runtime}: agreement {worst:.0%} < {threshold:.0%} with {reference} "
                f"(first difference, prompt {i}: {got[i].text[:60]!r} vs {ref[i].text[:60]!r})"
            )
    measured = min((min(r.values()) for r in rates.values()), default=None)
    summary = ", ".join(f"{k} {min(v.values()):.0%}" for k, v in rates.items())
    detail = f"agreement with {reference}: {summary or 'no runtimes compared'}"
    if problems:
        detail += "; " + "; ".join(problems)
    ok = not problems and bool(rates)
    return Verdict(
        name,
        ok,
        measured,
        min(thresholds.values(), default=None),
        detail,
        {"rates": rates, "reference": reference},
    )


def adapter_effect(
    base: Sequence[Answer],
    tuned: Mapping[str, Sequence[Answer]],
    references: Sequence[str],
    *,
    min_changed: float = MIN_CHANGED,
    min_score: float = MIN_TRAIN_SCORE,
) -> Verdict:
    """On training questions, every fine-tuned runtime answers unlike the base model and gives the trained
    answer (exact or contained) on at least min_score of them, more often than the base does."""
    name = "adapter_effect"
    if not references or not tuned or len(base) != len(references):
        return Verdict(
            name, False, None, min_score, "no training questions, base answers or fine-tuned runtimes"
        )
    base_score = _rate([answer_score(b.text, r) >= 1 for b, r in zip(base, references, strict=True)])
    problems, per_runtime = [], {}
    for runtime, got in tuned.items():
        if len(got) != len(references):
            problems.append(f"{runtime}: {len(got)} answers for {len(references)} questions")
            continue
        changed = _rate([a.text.strip() != b.text.strip() for a, b in zip(got, base, strict=True)])
        score = _rate([answer_score(a.text, r) >= 1 for a, r in zip(got, references, strict=True)])
        per_runtime[runtime] = {"changed": changed, "score": score}
        if changed < min_changed:
            problems.append(
                f"{runtime}: only {changed:.0%} of answers differ from the base (need {min_changed:.0%})"
            )
        if score < min_score or score <= base_score:
            problems.append(
                f"{runtime}: trained answers on {score:.0%} (need >= {min_score:.0%} and > base {base_score:.0%})"
            )
    measured = min((v["score"] for v in per_runtime.values()), default=None)
    detail = f"base {base_score:.0%} right; " + ", ".join(
        f"{k} {v['score']:.0%} right, {v['changed']:.0%} changed" for k, v in per_runtime.items()
    )
    if problems:
        detail += "; " + "; ".join(problems)
    data = {"base_score": base_score, "runtimes": per_runtime, "min_changed": min_changed}
    return Verdict(name, not problems and bool(per_runtime), measured, min_score, detail, data)


def clean_endings(
    tuned: Mapping[str, Sequence[Answer]], *, max_tokens: int, markers: Sequence[str] = ()
) -> Verdict:
    """Every fine-tuned answer ended on a stop token (not max_tokens) and shows no chat-control tokens."""
    name = "clean_endings"
    problems, total, clean = [], 0, 0
    for runtime, got in tuned.items():
        for i, a in enumerate(got):
            total += 1
            why = []
            if a.finish_reason != "stop":
                why.append(f"finish_reason {a.finish_reason!r} (max_tokens {max_tokens})")
            shown = SPECIAL_TOKEN.search(a.text) or next((m for m in markers if m and m in a.text), None)
            if shown:
                why.append(f"shows {shown.group(0) if hasattr(shown, 'group') else shown!r}")
            if why:
                problems.append(f"{runtime} #{i} {a.text[:40]!r}: {', '.join(why)}")
            else:
                clean += 1
    share = clean / total if total else 0.0
    detail = f"{clean}/{total} answers ended cleanly"
    if problems:
        detail += (
            "; " + "; ".join(problems[:6]) + (f" (+{len(problems) - 6} more)" if len(problems) > 6 else "")
        )
    return Verdict(name, total > 0 and not problems, share, 1.0, detail, {"problems": problems})


def tokenizer_gate(
    texts: Sequence[str], hf_ids: Sequence[Sequence[int]], gguf_ids: Sequence[Sequence[int]] | Exception
) -> Verdict:
    """The GGUF's tokenization (llama.cpp) of every sample text equals the HF tokenizer's ids."""
    result = _tokenizer_parity(texts, hf_ids, gguf_ids)
    rate = result.metrics.get("match_rate", 0.0)
    detail = f"{rate:.0%} of {len(texts)} texts tokenize identically"
    if result.problems:
        detail += "; " + "; ".join(result.problems[:3])
    return Verdict("tokenizer_parity", result.ok, rate, 1.0, detail, {"metrics": result.metrics})


def logprob_gate(result: ParityResult | Exception, *, gguf_type: str, max_abs: float) -> Verdict:
    """Wrap llamacpp.logprob_parity (llama.cpp top-k logprobs vs the fused MLX model's) as a Verdict."""
    if isinstance(result, Exception):
        return Verdict("logprob_parity", False, None, max_abs, f"could not compare logprobs: {result}")
    m = result.metrics
    detail = (
        f"{gguf_type}: max |diff| {m.get('max_abs_diff', float('nan')):.3g} (tolerance {max_abs:g}), "
        f"top-1 agreement {m.get('top1_agreement_tol', 0):.0%} over {int(m.get('positions', 0))} positions"
    )
    if result.problems:
        detail += "; " + "; ".join(result.problems)
    return Verdict("logprob_parity", result.ok, m.get("max_abs_diff"), max_abs, detail, {"metrics": m})
