"""The quantized-export gates: the file is the type asked for (quant_types), and it answers like the f16 GGUF of
the same fused model on held-out text within the configured quality bar (quant_quality).

The bar is a product decision, not a noise tolerance, set between what healthy and broken quantizations
measured here (README, "Shipping a quantized GGUF"): healthy q8_0, q6_K and q4_K_M of SmolLM2 and Gemma 3 270M
fine-tunes reach KL 0.064 mean / 0.556 p99 at most (SmolLM2's release fine-tune at q4_K_M), top-1 >= 0.884,
perplexity <= x1.049; q4_0, q2_K and a damaged tensor measure KL >= 0.200 mean / 1.59 p99. The KL bars are the
geometric midpoints of those gaps (0.12, 0.95). SmolLM2's q5_K_M, mostly Q5_1 by row-size fallback, fails on
perplexity alone (x1.202).
"""

from __future__ import annotations

from typing import Any

from finetune.gates.registry import DEFAULT
from finetune.gates.verdict import Verdict, skipped, verdict


def quant_types(problems: list[str], qtype: str, tensors: int) -> Verdict:
    """problems: finetune.export.quant_types.check_quant_types's list for the shipped file."""
    detail = f"{qtype}: file type and all {tensors} tensors' types as llama.cpp writes them" + (
        ": " + "; ".join(problems) if problems else ""
    )
    return verdict("quant_types", not problems, float(len(problems)), 0.0, detail, {"problems": problems})


def limits_from(gates: Any) -> dict[str, float]:
    keys = ("quant_kl_mean_max", "quant_kl_p99_max", "quant_top1_min", "quant_ppl_ratio_max")
    return {k: float(getattr(gates, k, DEFAULT[k])) for k in keys}


def quant_quality(m: Any, qtype: str, limits: dict[str, float]) -> Verdict:
    """m: a finetune.evaluate.quant_measure.QuantMeasurement of the shipped file vs the f16 GGUF."""
    problems = []
    if m.kl_mean > limits["quant_kl_mean_max"]:
        problems.append(f"mean KL {m.kl_mean:.4f} > {limits['quant_kl_mean_max']:g}")
    if m.kl_p99 > limits["quant_kl_p99_max"]:
        problems.append(f"p99 KL {m.kl_p99:.4f} > {limits['quant_kl_p99_max']:g}")
    if m.top1 < limits["quant_top1_min"]:
        problems.append(f"top-1 agreement {m.top1:.3f} < {limits['quant_top1_min']:g}")
    if not m.ppl_ratio <= limits["quant_ppl_ratio_max"]:  # NaN (nothing scored) fails too
        problems.append(f"perplexity x{m.ppl_ratio:.3f} > x{limits['quant_ppl_ratio_max']:g}")
    detail = (
        f"{qtype} vs f16 in llama.cpp over {m.positions} held-out positions: KL mean {m.kl_mean:.4f}, p99 "
        f"{m.kl_p99:.4f}; top-1 {m.top1:.3f}; perplexity {m.reference_ppl:.2f} -> {m.quantized_ppl:.2f} "
        f"(x{m.ppl_ratio:.3f})"
    )
    if problems:
        detail += ": " + "; ".join(problems)
    return verdict(
        "quant_quality",
        not problems,
        m.kl_mean,
        limits["quant_kl_mean_max"],
        detail,
        {**m.to_dict(), **limits},
    )


def quant_answers(scores: dict[str, Any], qtype: str, kept_min: float) -> Verdict:
    """scores: export_quantized's {"f16": {train, heldout}, qtype: ..., "ollama <qtype>": ...} (shares right) or
    {"skipped": why}. What the fine-tune taught, kept: right answers of the quantized file per right answer of the
    f16, in each runtime; the worst runtime is the measure. An f16 with none right leaves nothing to judge: a skip."""
    if "skipped" in scores:
        return skipped("quant_answers", f"{qtype}: {scores['skipped']}", kept_min)
    right = {name: sum(v or 0.0 for v in (s or {}).values()) for name, s in scores.items()}
    if not right.get("f16"):
        return skipped("quant_answers", f"{qtype}: the f16 GGUF answers none of the questions right: nothing "
                       "to keep (train the run longer)", kept_min)  # fmt: skip
    runtimes = {"llama.cpp": qtype, "Ollama": f"ollama {qtype}"}
    kept = {rt: right.get(key, 0.0) / right["f16"] for rt, key in runtimes.items() if key in scores}
    worst = min(kept.values(), default=0.0)
    shares = "; ".join(f"{name} {_shares(s)}" for name, s in scores.items())
    detail = f"{qtype} keeps " + ", ".join(f"{v:.0%} in {rt}" for rt, v in kept.items())
    detail += f" of the f16's right answers (train/held-out: {shares})"
    if set(kept) != set(runtimes):
        detail += f"; not asked in {', '.join(sorted(set(runtimes) - set(kept)))}"
    return verdict("quant_answers", worst >= kept_min and set(kept) == set(runtimes), worst, kept_min, detail,
                   {"kept": kept, "scores": scores})  # fmt: skip


def _shares(s: dict[str, float | None] | None) -> str:
    return "/".join("-" if v is None else f"{v:.0%}" for v in (s or {}).values())
