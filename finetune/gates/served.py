"""Gates on the model Ollama serves: its answers, its template and stop strings, its API behaviour."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from finetune.gates.parity import Answer, agrees
from finetune.gates.scoring import is_right
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
    same = [agrees(a.text.strip(), b.text.strip(), b) for a, b in zip(served, reference, strict=True)]
    right = [is_right(a.text, r) for a, r in zip(served, references, strict=True)]
    agree, correct = sum(same) / len(same), sum(right) / len(right)
    ref_right = sum(is_right(b.text, r) for b, r in zip(reference, references, strict=True)) / len(right)
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
    prompts: Mapping[str, Any],
) -> Verdict:
    """What Ollama serves renders prompts as training did: its TEMPLATE and stop strings are exactly the ones
    the training template needs (an extra stop string cuts answers short), and the prompt Ollama rendered for
    each evaluated conversation has training's token ids.

    prompts: "training_ids" (the training renderer's ids per prompt), "served_ids" (ids of the text Ollama
    rendered, None where it logged none), "tokenizer" (which tokenizer read the rendered text) and
    "served_counts" (Ollama's own prompt_eval_count per prompt)."""
    name = "served_template"
    problems = []
    if shown_template != expected_template:
        problems.append(
            f"served TEMPLATE differs from the {len(expected_template)}-char template training needs "
            f"(served starts {shown_template[:60]!r})"
        )
    missing = [s for s in expected_stops if s not in shown_stops]
    extra = [s for s in shown_stops if s not in expected_stops]
    if missing:
        problems.append(f"served stop strings {list(shown_stops)} lack {missing}")
    if extra:
        problems.append(f"served stop strings {extra} are not end markers of the training template")
    training = list(prompts.get("training_ids", []))
    served = list(prompts.get("served_ids", []))
    pairs = [(s, t) for s, t in zip(served, training, strict=False) if s is not None]
    off = [(s, t) for s, t in pairs if list(s) != list(t)]
    if not pairs:
        problems.append(f"Ollama logged no rendered prompt for the {len(training)} evaluated conversations")
    elif off:
        s0, t0 = off[0]
        at = next((i for i, (a, b) in enumerate(zip(s0, t0, strict=False)) if a != b), min(len(s0), len(t0)))
        problems.append(
            f"{len(off)}/{len(pairs)} prompts Ollama rendered differ from training's token ids (first at "
            f"position {at}: {list(s0[at : at + 4])} vs {list(t0[at : at + 4])}; {len(s0)} vs {len(t0)} ids)"
        )
    counted = zip(prompts.get("served_counts", []), training, strict=False)
    if other := [(c, len(t)) for c, t in counted if c and c != len(t)]:
        problems.append(f"Ollama counted other prompt lengths than training's: {other[:3]}")
    detail = (
        f"template and stop strings as training needs; {len(pairs) - len(off)}/{len(pairs)} rendered prompts "
        f"have training's token ids ({prompts.get('tokenizer', '?')})"
    )
    if problems:
        detail = "; ".join(problems)
    data = {"stops": list(shown_stops), "prompts_compared": len(pairs)}
    return verdict(name, not problems, float(len(problems) == 0), 1.0, detail, data)


def _number(values: Sequence[str] | None) -> float | None:
    try:
        return float(values[-1]) if values else None
    except ValueError:
        return None


def served_defaults(
    shown: Mapping[str, Sequence[str]],
    configured: Mapping[str, Any],
    *,
    trained_context: int,
    model_context: int | None,
    longest_answer: int,
    api_answers: Sequence[Answer],
    openai: Mapping[str, Any] | None,
) -> Verdict:
    """A request with no options (what `ollama run`, /api/chat and /v1/chat/completions users send) gets the
    model that was judged: the Modelfile's PARAMETERs are the configured ones, its num_ctx holds the trained
    context, its num_predict never cuts a reference answer, and the OpenAI endpoint renders the same prompt,
    stops the same way and, at temperature 0, answers what /api/chat answered.

    shown: `ollama show`'s parameters (name -> values); api_answers: /api/chat default answers, the first of
    which `openai` ({"defaults": [...], "greedy": {...}}, runtimes.openai_answers) asked again."""
    name = "served_defaults"
    problems, notes = [], []
    problems += _parameter_problems(shown, configured)
    ctx = _number(shown.get("num_ctx"))
    if ctx is None:
        problems.append("no num_ctx: the context a default request gets depends on the Ollama version")
    elif ctx < trained_context:
        problems.append(f"num_ctx {ctx:g} < the trained context {trained_context}")
    elif model_context and ctx > model_context:
        problems.append(f"num_ctx {ctx:g} > the model's context length {model_context}")
    n = _number(shown.get("num_predict"))
    if n is not None and 0 <= n < longest_answer:
        problems.append(
            f"num_predict {n:g} cuts answers shorter than the longest reference ({longest_answer} tokens)"
        )
    notes.append(
        f"num_ctx {ctx if ctx is None else f'{ctx:g}'}, num_predict {'unbounded' if n is None or n < 0 else f'{n:g}'}"
    )
    data: dict[str, Any] = {"num_ctx": ctx, "num_predict": n, "longest_answer": longest_answer}
    if openai is None or not api_answers:
        problems.append("the OpenAI-compatible endpoint was not asked")
    else:
        problems += _openai_problems(openai, api_answers[0])
        texts = [d["text"] for d in openai["defaults"]]
        data["openai_default_distinct"] = len(set(texts))
        if len(set(texts)) > 1:  # measured on Ollama 0.5.4: /v1 applies the OpenAI API's temperature 1.0
            notes.append(
                f"/v1 requests without temperature are sampled ({len(set(texts))} different answers of "
                f"{len(texts)}): the Modelfile's temperature does not reach OpenAI-API users on this Ollama"
            )
    detail = "; ".join(problems or ["default requests get the judged model"]) + f" ({'; '.join(notes)})"
    return verdict(name, not problems, float(not problems), 1.0, detail, data)


def _parameter_problems(shown: Mapping[str, Sequence[str]], configured: Mapping[str, Any]) -> list[str]:
    """Sampling as configured: every configured PARAMETER served with its value, and a temperature at all."""
    problems = []
    for key, want in configured.items():
        got = shown.get(key)
        number = _number(got)
        if not got:
            problems.append(f"{key} {want!r} is configured but not served")
        elif number is not None and isinstance(want, int | float):
            if abs(number - float(want)) > 1e-6:
                problems.append(f"{key} is {got[-1]} as served, {want} as configured")
        elif str(got[-1]) != str(want):
            problems.append(f"{key} is {got[-1]!r} as served, {want!r} as configured")
    if "temperature" not in shown:
        problems.append(
            "no temperature: default requests sample at Ollama's 0.8, not the greedy answers judged"
        )
    return problems


def _openai_problems(openai: Mapping[str, Any], api: Answer) -> list[str]:
    out = []
    rendered = {d.get("rendered") for d in [*openai["defaults"], openai["greedy"]]}
    if rendered != {api.rendered}:
        out.append(f"/v1 rendered {sorted(map(str, rendered))[:2]} where /api/chat rendered {api.rendered!r}")
    greedy = openai["greedy"]
    if greedy["text"].strip() != api.text.strip():
        out.append(f"/v1 at temperature 0 answered {greedy['text'][:60]!r}, /api/chat {api.text[:60]!r}")
    if greedy.get("finish") != "stop":
        out.append(f"/v1 at temperature 0 ended with finish_reason {greedy.get('finish')!r}, not 'stop'")
    return out


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
