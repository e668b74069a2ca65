"""Gates on the model Ollama serves: its answers, its template and stop strings, its API behaviour."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from finetune.gates.parity import Answer
from finetune.gates.scoring import answer_score
from finetune.gates.verdict import Verdict, verdict


def served_answers(
    served: Sequence[Answer], reference: Sequence[Answer], references: Sequence[str], *, threshold: float
) -> Verdict:
    """On training questions (answers known) Ollama gives MLX + adapter's greedy answers, and right ones."""
    name = "served_answers"
    if not served or len(served) != len(reference) or len(reference) != len(references):
        return verdict(
            name, False, None, threshold, f"{len(served)} served answers for {len(references)} questions"
        )
    same = [a.text.strip() == b.text.strip() for a, b in zip(served, reference, strict=True)]
    right = [answer_score(a.text, r) >= 1 for a, r in zip(served, references, strict=True)]
    agree, correct = sum(same) / len(same), sum(right) / len(right)
    ref_right = sum(answer_score(b.text, r) >= 1 for b, r in zip(reference, references, strict=True)) / len(
        right
    )
    detail = f"Ollama == MLX+adapter on {sum(same)}/{len(same)} training questions; right on {correct:.0%} (MLX {ref_right:.0%})"
    problems = []
    if agree < threshold:
        i = same.index(False)
        problems.append(
            f"agreement {agree:.0%} < {threshold:.0%} (first: {served[i].text[:50]!r} vs {reference[i].text[:50]!r})"
        )
    if correct < ref_right * threshold:
        problems.append(f"right on {correct:.0%}, MLX + adapter on {ref_right:.0%}")
    if problems:
        detail += ": " + "; ".join(problems)
    return verdict(
        name, not problems, agree, threshold, detail, {"correct": correct, "reference_correct": ref_right}
    )


def served_template(
    shown_template: str,
    shown_stops: Sequence[str],
    expected_template: str,
    expected_stops: Sequence[str],
    prompt_tokens: Mapping[str, Sequence[int | None]],
) -> Verdict:
    """What Ollama serves renders prompts as training did: its TEMPLATE and stop strings are the ones the
    training template needs, and the prompts it evaluated have the training render's token counts."""
    name = "served_template"
    problems = []
    if shown_template != expected_template:
        problems.append(
            f"served TEMPLATE differs from the {len(expected_template)}-char template training needs "
            f"(served starts {shown_template[:60]!r})"
        )
    missing = [s for s in expected_stops if s not in shown_stops]
    if missing:
        problems.append(f"served stop strings {list(shown_stops)} lack {missing}")
    served, expected = list(prompt_tokens.get("served", [])), list(prompt_tokens.get("expected", []))
    pairs = [(s, e) for s, e in zip(served, expected, strict=False) if s is not None and e is not None]
    off = [(s, e) for s, e in pairs if s != e]
    if off:
        problems.append(
            f"{len(off)}/{len(pairs)} served prompts have another token count than training's "
            f"(e.g. {off[0][0]} vs {off[0][1]})"
        )
    detail = f"template and stop strings as training needs; {len(pairs) - len(off)}/{len(pairs)} prompt token counts equal"
    if problems:
        detail = "; ".join(problems)
    return verdict(name, not problems, float(len(problems) == 0), 1.0, detail, {"stops": list(shown_stops)})


def served_api(checks: Sequence[Any]) -> Verdict:
    """Every API behaviour check passed (streaming, concurrency at temperature 0, errors)."""
    name = "served_api"
    if not checks:
        return verdict(name, False, None, 1.0, "no API checks ran")
    bad = [c for c in checks if not c.passed]
    detail = f"{len(checks) - len(bad)}/{len(checks)} API checks passed"
    if bad:
        detail += ": " + "; ".join(f"{c.name}: {c.detail}" for c in bad)
    return verdict(
        name,
        not bad,
        (len(checks) - len(bad)) / len(checks),
        1.0,
        detail,
        {"checks": [{"name": c.name, "passed": c.passed, "detail": c.detail} for c in checks]},
    )
