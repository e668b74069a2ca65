"""The adapter-export gate: the shipped adapter, loaded by the runtime users load it with, computes what the
adapter the run trained and judged computes, within what those two runtimes differ by with no adapter at all."""

from __future__ import annotations

from typing import Any

from finetune.gates.registry import DEFAULT
from finetune.gates.verdict import Verdict, verdict


def peft_parity(m: Any, multiple: float = DEFAULT["adapter_floor_multiple"]) -> Verdict:
    """m: a finetune.evaluate.adapter_measure.AdapterMeasurement (floor, gap, effect, positions)."""
    return _parity("peft_parity", "transformers + peft", m, multiple)


def gguf_lora_parity(m: Any, multiple: float = DEFAULT["adapter_floor_multiple"]) -> Verdict:
    """The GGUF LoRA on the base GGUF in llama.cpp vs MLX (llama.cpp's top-k at every position)."""
    return _parity("gguf_lora_parity", "llama.cpp + GGUF LoRA", m, multiple)


def _parity(name: str, runtime: str, m: Any, multiple: float) -> Verdict:
    limit = multiple * m.floor
    problems = []
    if m.gap > limit:
        problems.append(
            f"the export differs by {m.gap:.3g}, more than {multiple:g} x the floor ({limit:.3g})"
        )
    if m.effect <= limit:  # an adapter that moves nothing, or a base far from the trained one, proves nothing
        problems.append(
            f"the adapter moves log p by {m.effect:.3g}, within {multiple:g} x the base-vs-base floor "
            f"({m.floor:.3g}): nothing to compare (a floor that large is a base other than the trained one)"
        )
    detail = (
        f"{runtime} vs MLX + adapter: max |d log p| {m.gap:.3g} over {m.positions} positions; base vs "
        f"base {m.floor:.3g} (allowed {multiple:g} x); the adapter itself moves log p by {m.effect:.3g}"
    )
    if problems:
        detail += ": " + "; ".join(problems)
    measured = m.gap / m.floor if m.floor else float("inf") if m.gap else 0.0
    return verdict(name, not problems, measured, multiple, detail, m.to_dict())


def served_adapter(m: Any, threshold: float = DEFAULT["text_agreement"]) -> Verdict:
    """m: a finetune.evaluate.served_adapter.ServedAdapterMeasurement (Ollama FROM base + ADAPTER vs MLX)."""
    share = m.agree / m.prompts if m.prompts else 0.0
    problems = []
    if share < threshold:
        problems.append(f"{m.agree} of {m.prompts} answers equal MLX + adapter's, below {threshold:g}")
    if not m.adapter_changes:
        problems.append("the adapter changes no answer in MLX: nothing to compare")
    elif not m.served_changes:
        problems.append(
            "Ollama answers like the base wherever the adapter changes the answer: ADAPTER not applied"
        )
    detail = (
        f"Ollama (FROM base GGUF + ADAPTER, default /api/chat requests) vs MLX + adapter: {m.agree}/{m.prompts} "
        f"training answers equal; the adapter changes {m.adapter_changes} answers, Ollama {m.served_changes} of them"
    )
    if problems:
        detail += ": " + "; ".join(problems)
    return verdict("served_adapter", not problems, share, threshold, detail, m.to_dict())


def adapters_separate(
    own: dict[str, float], cross: dict[str, dict[str, float]], threshold: float = DEFAULT["text_agreement"]
) -> Verdict:
    """Several adapters on one base, served side by side by one Ollama: own[m] is the share of m's training
    questions model m answers as MLX + its adapter does; cross[m][n] the share of n's questions (those n's
    adapter changes) model m answers with n's answers. Each must answer its own and not the others'."""
    limit = 1 - threshold
    problems = [
        f"{m} answers {s:.0%} of its own questions as its adapter does"
        for m, s in own.items()
        if s < threshold
    ]
    problems += [
        f"{m} gives {n}'s answers to {s:.0%} of {n}'s questions (at most {limit:.0%})"
        for m, row in cross.items()
        for n, s in row.items()
        if s > limit
    ]
    worst = max((s for row in cross.values() for s in row.values()), default=0.0)
    detail = (
        f"{len(own)} adapters on one base in one Ollama: own answers "
        + ", ".join(f"{m} {s:.0%}" for m, s in own.items())
        + f"; the most any gives another's answers: {worst:.0%}"
    )
    if problems:
        detail += ": " + "; ".join(problems)
    return verdict("adapters_separate", not problems, worst, limit, detail, {"own": own, "cross": cross})
