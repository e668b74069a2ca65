"""Five of the training gates of a training run. Each takes measurements made from the saved run (metrics.jsonl,
adapter files, answers of base + SAVED adapter) and returns a Verdict; none touches a model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from finetune.gates.registry import DEFAULT, Gate
from finetune.gates.scoring import MIN_GAIN, answer_score, improved, is_long
from finetune.gates.verdict import Verdict, verdict

ADAPTER_LEAVES = ("lora_a", "lora_b", "m")


# ---------------------------------------------------------------- loss convergence


def loss_convergence(
    losses: Sequence[float],
    *,
    drop: float = DEFAULT["loss_drop"],
    window: int = 5,
    max_initial: float | None = None,
    max_final: float | None = None,
) -> Verdict:
    """Final-window mean <= (1 - drop) x initial-window mean; windows, so one lucky step cannot pass."""
    name = "loss_convergence"
    losses = [float(x) for x in losses]
    if len(losses) < 2 * window:
        return verdict(
            name, False, None, 1 - drop, f"need >= {2 * window} steps for two windows, got {len(losses)}"
        )
    if not all(np.isfinite(losses)):
        return verdict(name, False, None, 1 - drop, "loss is NaN or infinite (diverged)")
    first, last = float(np.mean(losses[:window])), float(np.mean(losses[-window:]))
    ratio = last / first if first > 0 else float("inf")
    problems = []
    if ratio > 1 - drop:
        problems.append(f"final/initial = {ratio:.3f} > {1 - drop:.3f}")
    if max_initial is not None and first > max_initial:
        problems.append(f"initial loss {first:.3f} > cap {max_initial}")
    if max_final is not None and last > max_final:
        problems.append(f"final loss {last:.3f} > cap {max_final}")
    detail = f"initial {first:.4f} -> final {last:.4f} (x{ratio:.3f}, window {window})"
    if problems:
        detail += ": " + "; ".join(problems)
    return verdict(name, not problems, ratio, 1 - drop, detail, {"initial": first, "final": last})


# ---------------------------------------------------------------- model learning


def model_learning(
    before: Sequence[str],
    after: Sequence[str],
    references: Sequence[str],
    *,
    loss_before: float,
    loss_after: float,
    threshold: float = DEFAULT["learning_improvement"],
) -> Verdict:
    """Trained answers beat the base's on > threshold of cases (a long reference's similarity by MIN_GAIN or
    more), and teacher-forced loss drops."""
    name = "model_learning"
    if not (len(before) == len(after) == len(references)) or not references:
        return verdict(name, False, None, threshold, "answers and references differ in number or are empty")
    scores = [
        (answer_score(b, r), answer_score(a, r)) for b, a, r in zip(before, after, references, strict=True)
    ]
    wins = sum(1 for b, a in scores if improved(b, a))
    share = wins / len(scores)
    ok_share, ok_loss = share > threshold, loss_after < loss_before
    detail = (
        f"improved on {wins}/{len(scores)} = {share:.0%} (need > {threshold:.0%}); "
        f"teacher-forced loss {loss_before:.4f} -> {loss_after:.4f}"
    )
    if not ok_loss:
        detail += " (did not drop)"
    if graded := sum(map(is_long, references)):
        detail += f"; {graded} long references graded by token similarity (a win gains >= {MIN_GAIN})"
    cases = [
        {"reference": r, "before": b, "after": a, "before_score": sb, "after_score": sa}
        for (sb, sa), b, a, r in zip(scores, before, after, references, strict=True)
    ]
    return verdict(
        name,
        ok_share and ok_loss,
        share,
        threshold,
        detail,
        {"cases": cases, "loss_before": loss_before, "loss_after": loss_after},
    )


# ---------------------------------------------------------------- memory efficiency


def memory_efficiency(
    lora_peak: int, full_peak: int, *, saving: float = DEFAULT["memory_saving"], source: str = "measured"
) -> Verdict:
    """LoRA's peak must be at least `saving` below full fine-tuning of the same model, batch and length.

    source says how the peaks were obtained: "measured" (each in its own process) or "estimated" (the full
    run would not fit in free memory, so both come from the calibrated estimator).
    """
    name = "memory_efficiency"
    if full_peak <= 0 or lora_peak <= 0:
        return verdict(name, False, None, saving, f"missing measurement (lora {lora_peak}, full {full_peak})")
    measured = 1 - lora_peak / full_peak
    detail = (
        f"{source}: LoRA peak {lora_peak / 2**20:.0f} MiB vs full {full_peak / 2**20:.0f} MiB: "
        f"saving {measured:.1%} (need >= {saving:.0%})"
    )
    return verdict(name, measured >= saving, measured, saving, detail, {"source": source})


# ---------------------------------------------------------------- parameter updates


def is_adapter_tensor(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ADAPTER_LEAVES


def parameter_updates(
    initial: Mapping[str, np.ndarray],
    final: Mapping[str, np.ndarray],
    *,
    steps: int,
    base_recorded: Mapping[str, str],
    base_now: Mapping[str, str],
    fine_tune_type: str = "lora",
    threshold: float = DEFAULT["lora_params_changed"],
    min_steps: int = 3,
) -> Verdict:
    """The saved adapter vs its saved step-0 state: > threshold of adapter elements moved (lora_b starts at
    zero, so B must move) and, for adapters, every tensor moved (one that never did is not wired in, however
    many elements the others moved); the adapter holds adapter tensors only (a trained base weight would be in
    it); the base model's files on disk are byte-identical to the sha256 recorded before training."""
    name = "parameter_updates"
    problems = []
    if steps < min_steps:
        problems.append(f"only {steps} steps (need >= {min_steps})")
    if not initial or set(initial) != set(final):
        return verdict(
            name, False, None, threshold, "no adapter tensors, or the saved sets differ from step 0"
        )
    per_tensor, changed, total = {}, 0, 0
    for key, old in initial.items():
        diff = np.asarray(old) != np.asarray(final[key])
        per_tensor[key] = float(diff.mean())
        changed, total = changed + int(diff.sum()), total + diff.size
    share = changed / total
    if share <= threshold:
        problems.append(f"only {share:.1%} of trained elements changed (need > {threshold:.0%})")
    base_trained = [] if fine_tune_type == "full" else sorted(k for k in final if not is_adapter_tensor(k))
    if base_trained:
        problems.append(f"{len(base_trained)} base tensor(s) were trained and saved (e.g. {base_trained[0]})")
    moved = sorted(f for f, sha in base_recorded.items() if base_now.get(f) != sha)
    if moved:
        problems.append(f"{len(moved)} base model file(s) changed on disk (e.g. {moved[0]})")
    if not base_recorded:
        problems.append("no base model file digests were recorded")
    frozen = sorted(k for k, v in per_tensor.items() if v == 0.0)
    if frozen and fine_tune_type != "full":
        problems.append(f"{len(frozen)} of {len(per_tensor)} adapter tensors never moved (e.g. {frozen[0]})")
    detail = f"{share:.1%} of {total:,} trained elements changed; base files unchanged: {not moved}"
    if frozen and fine_tune_type == "full":
        detail += f"; {len(frozen)} tensors unchanged"
    if problems:
        detail += ": " + "; ".join(problems)
    data: dict[str, Any] = {
        "frozen_tensors": frozen[:20],
        "base_trained": base_trained[:20],
        "base_files_moved": moved,
    }
    return verdict(name, not problems, share, threshold, detail, data)


# ---------------------------------------------------------------- artifacts


def artifacts(
    problems: Sequence[str],
    disk_answers: Sequence[str] | None,
    memory_answers: Sequence[str] | None,
) -> Verdict:
    """The run's files exist and parse, the saved adapter loads, and base + SAVED adapter gives the same probe
    answers as the model that was in memory when training ended (an adapter that saved wrong does not)."""
    name = "artifacts"
    problems = list(problems)
    agreement = None
    if not problems:
        if disk_answers is None or memory_answers is None or len(disk_answers) != len(memory_answers):
            problems.append("no probe answers to compare (in-memory answers missing from the run)")
        elif not disk_answers:  # 0 of 0 agreeing is no evidence that the saved adapter is the trained one
            problems.append("no probe questions to compare the saved adapter with the in-memory model on")
        else:
            same = [a == b for a, b in zip(disk_answers, memory_answers, strict=True)]
            agreement = sum(same) / len(same) if same else 0.0
            if not all(same):
                i = same.index(False)
                problems.append(
                    f"saved adapter answers differ from the in-memory model on {same.count(False)}/{len(same)} "
                    f"probes (first: {disk_answers[i][:50]!r} vs {memory_answers[i][:50]!r})"
                )
    detail = (
        f"all present and loadable; saved adapter reproduces {agreement:.0%} of in-memory answers"
        if not problems
        else "; ".join(problems)
    )
    return verdict(name, not problems, agreement, 1.0, detail)


# ---------------------------------------------------------------- forgetting


def forgetting(
    general_before: float | None,
    general_after: float | None,
    *,
    texts: int,
    max_ratio: float = DEFAULT["max_perplexity_ratio"],
) -> Verdict:
    """Base + SAVED adapter's perplexity on general text no run trains on (finetune.evaluate.general_text) is at
    most max_ratio times the base's: the fine-tune kept the language it started from."""
    name = "forgetting"
    if general_before is None or general_after is None:
        return verdict(name, False, None, max_ratio, "no general-text perplexity was measured")
    ratio = float(np.exp(general_after - general_before))
    detail = (
        f"perplexity on {texts} general texts: base {np.exp(general_before):.2f}, base + adapter "
        f"{np.exp(general_after):.2f} (x{ratio:.3f}, needs <= x{max_ratio:g})"
    )
    data = {"nll_before": general_before, "nll_after": general_after}
    return verdict(name, ratio <= max_ratio, ratio, max_ratio, detail, data)


# ---------------------------------------------------------------- gates declared by their row alone


def declared_gate(gate: Gate, result: dict[str, Any], threshold: float) -> Verdict:
    """A gate whose row gives its metric: the measured value from what training recorded, against threshold."""
    assert gate.metric is not None, gate.name
    try:
        value = float(gate.metric(result))
    except (KeyError, TypeError, ValueError, ZeroDivisionError) as exc:
        return verdict(
            gate.name, False, None, threshold, f"not measurable from what training recorded: {exc!r}"
        )
    if not np.isfinite(value):
        return verdict(gate.name, False, None, threshold, f"measured {value} (not a finite number)")
    ok = value <= threshold if gate.lower_is_better else value >= threshold
    sign = "<=" if gate.lower_is_better else ">="
    return verdict(gate.name, ok, value, threshold, f"{value:.4g} (needs {sign} {threshold:g})")
