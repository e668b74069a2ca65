"""Tier 3 gates over the answers of several runtimes, the GGUF's tokenizer and its logprobs.

Runtimes: the MLX base model (for comparison), and the fine-tuned model as (a) MLX base + adapter,
(b) the fused MLX folder, (c) the GGUF in llama.cpp, (d) the GGUF served by Ollama. Pure functions:
finetune.evaluate measures (RuntimeMeasurements), judge_runtimes judges.
"""

from __future__ import annotations

import re
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from finetune.gates.parity import (
    Answer,
    ParityResult,
    agrees,
    content_tokens,
    logprob_parity,
    tokenizer_parity,
)
from finetune.gates.scoring import is_right
from finetune.gates.verdict import Verdict, skipped, verdict

TUNED = ("mlx_adapter", "mlx_fused", "llamacpp", "ollama")
REFERENCE = "mlx_adapter"
# The fine-tuned model must answer differently from the base on at least half the training questions
# and contain the trained answer on at least half (a lost LoRA scale or a fuse that drops the adapter
# gives base answers: ~0 changed, ~0 right).
MIN_CHANGED = 0.5
MIN_TRAIN_SCORE = 0.5
# Chat-control tokens of the formats we deploy; an answer showing one did not stop where it should.
SPECIAL_TOKEN = re.compile(
    r"<\|[A-Za-z0-9_]+\|>|</s>|<s>|<(?:start|end)_of_turn>|<eos>|<bos>|\[/?INST\]|### Instruction:"
)


# The reference (base + adapter) must end on its end token on at least this share of its answers: built-in
# sets 24/24, the HumanEval quick fine-tune 14/17 (run-ons on 3 questions it never learned); an untrained end
# marker: none (label_mask's fault).
MIN_REFERENCE_ENDINGS = 0.5

# Near-ties: a top-1 that trails the reference's by less than this share of the tolerance counts as agreeing.
TIE_SHARE = 0.5


@dataclass
class RuntimeMeasurements:
    """Everything tier 3's evaluation measured; judge_runtimes turns it into verdicts."""

    prompts: list[Any]  # EvalPrompt
    gguf_type: str
    stops: list[str]
    end_ids: list[int]
    answers: dict[str, list[Answer]] = field(default_factory=dict)
    runtimes: dict[str, dict[str, Any]] = field(
        default_factory=dict
    )  # name -> {"status", "reason", "seconds"}
    tokenizer_texts: list[str] = field(default_factory=list)
    hf_ids: list[list[int]] = field(default_factory=list)
    gguf_ids: list[list[int]] | None = None
    gguf_ids_error: str | None = None
    # ReferenceRows of MLX base + adapter (or positions x vocab log-softmax rows)
    logprob_reference: Any = None
    logprob_candidate: list[dict[int, float]] | None = None
    # {"context", "positions"} of the long sequence
    logprob_long: dict[str, int] = field(default_factory=dict)
    logprob_error: str | None = None
    training_prompt_ids: list[list[int]] = field(default_factory=list)  # the training render's, per prompt
    served_prompt_ids: list[list[int] | None] = field(default_factory=list)  # of the text Ollama rendered
    served_ids_tokenizer: str = ""


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
        return verdict(name, False, None, None, f"no answers from the reference runtime {reference!r}")
    for runtime, threshold in thresholds.items():
        if runtime in errors:
            problems.append(f"{runtime}: no answers ({errors[runtime]})")
            continue
        got = answers.get(runtime)
        if got is None or len(got) != len(ref):
            problems.append(f"{runtime}: {0 if got is None else len(got)} answers for {len(ref)} prompts")
            continue
        same_text = [agrees(a.text.strip(), r.text.strip(), r) for a, r in zip(got, ref, strict=True)]
        rate = {"text": _rate(same_text)}
        if all(a.tokens is not None for a in got) and all(r.tokens is not None for r in ref):
            rate["tokens"] = _rate(
                [
                    agrees(content_tokens(a.tokens, end_ids), content_tokens(r.tokens, end_ids), r)
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
    return verdict(
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
        return verdict(
            name, False, None, min_score, "no training questions, base answers or fine-tuned runtimes"
        )
    base_score = _rate([is_right(b.text, r) for b, r in zip(base, references, strict=True)])
    problems, per_runtime = [], {}
    for runtime, got in tuned.items():
        if len(got) != len(references):
            problems.append(f"{runtime}: {len(got)} answers for {len(references)} questions")
            continue
        changed = _rate([a.text.strip() != b.text.strip() for a, b in zip(got, base, strict=True)])
        score = _rate([is_right(a.text, r) for a, r in zip(got, references, strict=True)])
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
    return verdict(name, not problems and bool(per_runtime), measured, min_score, detail, data)


def _stopped_on_this_path(a: Answer, ref: Sequence[Answer] | None, i: int) -> bool:
    """The reference ended on its end token with the same text so far (one is a prefix of the other). An answer
    that parted from the reference's earlier, at a near-tie, is output_parity's to count, not a stopping fault."""
    if ref is None or i >= len(ref):
        return True
    got, want = a.text.strip(), ref[i].text.strip()
    return ref[i].finish_reason == "stop" and (got.startswith(want) or want.startswith(got))


def clean_endings(
    tuned: Mapping[str, Sequence[Answer]],
    *,
    markers: Sequence[str] = (),
    reference: str = REFERENCE,
    min_reference: float = MIN_REFERENCE_ENDINGS,
) -> Verdict:
    """No fine-tuned answer shows chat-control text; every runtime ends on an end token wherever base + adapter
    (the reference) did, within the data's budget; the reference itself on at least min_reference of its
    answers. A run-on of the reference's own (a question it never learned to answer) is counted, not failed:
    what this gate judges is stopping as shipped (stop strings, end token, num_predict), not answer quality."""
    name = "clean_endings"
    ref = tuned.get(reference)
    problems, total, clean, runs_on = [], 0, 0, []
    for runtime, got in tuned.items():
        for i, a in enumerate(got):
            total += 1
            why = []
            if a.finish_reason != "stop" and runtime == reference:
                runs_on.append(i)
            elif a.finish_reason != "stop" and _stopped_on_this_path(a, ref, i):
                why.append(f"finish_reason {a.finish_reason!r} where {reference} ended on its end token")
            shown = SPECIAL_TOKEN.search(a.text) or next((m for m in markers if m and m in a.text), None)
            if shown:
                why.append(f"shows {shown.group(0) if hasattr(shown, 'group') else shown!r}")
            if why:
                problems.append(f"{runtime} #{i} {a.text[:40]!r}: {', '.join(why)}")
            else:
                clean += 1
    ref_share = 1 - len(runs_on) / len(ref) if ref else 0.0
    if ref is not None and ref_share < min_reference:
        problems.insert(0, f"{reference} ended on its end token on {ref_share:.0%} of its answers "
                           f"(needs >= {min_reference:.0%}): it never learned to stop")  # fmt: skip
    share = clean / total if total else 0.0
    detail = f"{clean}/{total} answers ended cleanly"
    if runs_on:
        detail += f" ({reference} itself ran to the budget on #{', #'.join(map(str, runs_on))}: not an ending fault)"
    if problems:
        detail += (
            "; " + "; ".join(problems[:6]) + (f" (+{len(problems) - 6} more)" if len(problems) > 6 else "")
        )
    data = {"problems": problems, "reference_runs_on": runs_on, "reference_share": ref_share}
    return verdict(name, total > 0 and not problems, share, 1.0, detail, data)


def tokenizer_gate(
    texts: Sequence[str], hf_ids: Sequence[Sequence[int]], gguf_ids: Sequence[Sequence[int]] | Exception
) -> Verdict:
    """The GGUF's tokenization (llama.cpp) of every sample text equals the HF tokenizer's ids."""
    result = tokenizer_parity(texts, hf_ids, gguf_ids)
    rate = result.metrics.get("match_rate", 0.0)
    detail = f"{rate:.0%} of {len(texts)} texts tokenize identically"
    if result.problems:
        detail += "; " + "; ".join(result.problems[:3])
    return verdict("gguf_tokenizer", result.ok, rate, 1.0, detail, {"metrics": result.metrics})


def logprob_gate(
    result: ParityResult | Exception, *, gguf_type: str, max_abs: float, long: Mapping[str, int] | None = None
) -> Verdict:
    """Wrap parity.logprob_parity (llama.cpp's top-k logprobs vs MLX base + adapter, both ways) as a Verdict."""
    if isinstance(result, Exception):
        return verdict("logprob_parity", False, None, max_abs, f"could not compare logprobs: {result}")
    m = result.metrics
    detail = (
        f"{gguf_type}: max |diff| {m.get('max_abs_diff', float('nan')):.3g} (tolerance {max_abs:g}), "
        f"top-1 agreement {m.get('top1_agreement_tol', 0):.0%} over {int(m.get('positions', 0))} positions"
    )
    if long:
        detail += f", the last {long['positions']} of a {long['context']}-token context among them"
    if result.problems:
        detail += "; " + "; ".join(result.problems)
    return verdict("logprob_parity", result.ok, m.get("max_abs_diff"), max_abs, detail, {"metrics": m})


def judge_runtimes(m: RuntimeMeasurements, g: Any) -> list[Verdict]:
    """output_parity, adapter_effect, clean_endings, gguf_tokenizer and logprob_parity; g is a GatesConfig."""
    tuned = {k: v for k, v in m.answers.items() if k in TUNED}
    failed = {k: v["reason"] for k, v in m.runtimes.items() if v["status"] == "failed"}
    quantized = m.gguf_type not in ("f16", "f32")
    gguf_required = g.quantized_text_agreement if quantized else g.text_agreement
    thresholds = {"mlx_fused": g.text_agreement}
    for name in ("llamacpp", "ollama"):
        if m.runtimes.get(name, {}).get("status") != "skipped":
            thresholds[name] = gguf_required
    verdicts = [
        output_parity(m.answers, reference=REFERENCE, thresholds=thresholds, end_ids=m.end_ids, errors=failed)
    ]
    train = [i for i, p in enumerate(m.prompts) if p.kind == "train"]
    if "mlx_base" in m.answers:
        verdicts.append(
            adapter_effect(
                [m.answers["mlx_base"][i] for i in train],
                {k: [v[i] for i in train] for k, v in tuned.items()},
                [m.prompts[i].reference for i in train],
                min_changed=g.adapter_min_changed,
                min_score=g.adapter_min_score,
            )
        )
    else:
        verdicts.append(
            verdict(
                "adapter_effect",
                False,
                None,
                g.adapter_min_score,
                f"no base answers: {failed.get('mlx_base')}",
            )
        )
    if failed_tuned := {k: v for k, v in failed.items() if k in TUNED}:
        verdicts.append(verdict("clean_endings", False, None, 1.0, f"runtimes failed: {failed_tuned}"))
    else:
        verdicts.append(clean_endings(tuned, markers=m.stops))
    llama = m.runtimes.get("llamacpp", {})
    if llama.get("status") == "skipped":
        why = f"llama.cpp unavailable: {llama.get('reason')}"
        return [*verdicts, skipped("gguf_tokenizer", why), skipped("logprob_parity", why)]
    gguf_ids: Any = RuntimeError(m.gguf_ids_error) if m.gguf_ids is None else m.gguf_ids
    verdicts.append(tokenizer_gate(m.tokenizer_texts, m.hf_ids, gguf_ids))
    max_abs = getattr(g.logprob_max_abs, m.gguf_type, g.logprob_max_abs.f16)
    if m.logprob_error or m.logprob_candidate is None:
        result: Any = RuntimeError(m.logprob_error or "no llama.cpp logprobs")
    else:
        result = logprob_parity(
            m.logprob_reference,
            m.logprob_candidate,
            max_abs=max_abs,
            tie_margin=max_abs * TIE_SHARE,
        )
    verdicts.append(logprob_gate(result, gguf_type=m.gguf_type, max_abs=max_abs, long=m.logprob_long))
    return verdicts
