"""Did the fine-tune learn facts, or only strings? Held-out questions, judged on base + adapter."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from finetune.gates.parity import Answer
from finetune.gates.registry import DEFAULT
from finetune.gates.scoring import is_right
from finetune.gates.verdict import Verdict, skipped, verdict


def _right(answers: Sequence[Answer], prompts: Sequence[Any], idx: Sequence[int]) -> float:
    return sum(is_right(answers[i].text, prompts[i].reference) for i in idx) / len(idx)


def heldout_score(
    prompts: Sequence[Any],
    answers: Mapping[str, Sequence[Answer]],
    *,
    threshold: float = DEFAULT["heldout_min_score"],
) -> Verdict:
    """Paraphrases of trained facts (the built-in sets have them): base + adapter right on at least `threshold`
    of them, and more often than the base. Without paraphrases (a dataset of your own): the test split's
    questions, on which the fine-tune must not score below the base. Fresh questions are reported either way."""
    name = "heldout_score"
    held = [i for i, p in enumerate(prompts) if p.kind == "heldout"]
    if not held:
        return skipped(name, "no held-out or test questions were asked", threshold)
    if "mlx_adapter" not in answers or "mlx_base" not in answers:
        return verdict(name, False, None, threshold, "no base or base + adapter answers to score")
    tuned, base = answers["mlx_adapter"], answers["mlx_base"]
    para = [i for i in held if getattr(prompts[i], "paraphrase", False)]
    fresh = [i for i in held if i not in para]
    data: dict[str, Any] = {"paraphrases": len(para), "unseen": len(fresh)}
    notes = []
    if fresh:
        data |= {"unseen_adapter": _right(tuned, prompts, fresh), "unseen_base": _right(base, prompts, fresh)}
        notes.append(
            f"{len(fresh)} unseen questions: adapter {data['unseen_adapter']:.0%}, base {data['unseen_base']:.0%}"
        )
    if para:
        a, b = _right(tuned, prompts, para), _right(base, prompts, para)
        head = f"{len(para)} paraphrases of trained facts: adapter {a:.0%} right, base {b:.0%} (needs >= {threshold:.0%} and > base)"
        return verdict(
            name, a >= threshold and a > b, a, threshold, "; ".join([head, *notes]), data | {"base": b}
        )
    a, b = data["unseen_adapter"], data["unseen_base"]
    detail = f"no paraphrases of trained facts (only the built-in sets have them); {notes[0]} (needs >= base)"
    return verdict(name, a >= b, a, None, detail, data | {"base": b})
