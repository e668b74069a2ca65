"""A quantized GGUF measured against the f16 GGUF of the same model, both in llama.cpp as users run them.

Per position of held-out text (teacher forced): KL(f16 || quantized) of the next-token distributions, whether
the most likely token agrees, and the log-probability each gives the text's real next token (perplexity).
llama.cpp reports the top-k, so the KL is taken over the reference's top-32 (read in the quantized model's top-128)
and the rest (position_kl says how a token outside the quantized list is priced).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

Row = tuple[float | None, dict[int, float]]  # (log p of the real next token, top-k {id: log p})
TOP_K = 32  # the reference's top-k; the quantized model lists more, so the reference's tokens are in it
QUANTIZED_K = 128
_TINY = 1e-12
MASKED = -1e30  # llama.cpp reports a -inf logit as -FLT_MAX: probability 0, no perplexity to take


@dataclass(frozen=True)
class QuantMeasurement:
    kl_mean: float
    kl_p99: float
    top1: float  # share of positions whose most likely token is the f16's
    ppl_ratio: float  # quantized perplexity / f16 perplexity on the real next tokens
    positions: int
    scored: int  # positions whose real next token both runs reported (the perplexity's)
    reference_ppl: float
    quantized_ppl: float

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def position_kl(p_top: dict[int, float], q_top: dict[int, float]) -> float:
    """KL(P || Q) over P's top-k tokens and the rest. A token Q's (longer) top-k lacks has at most Q's smallest
    listed probability, and those tokens form one bucket priced at that bound; exact when both lists hold the
    whole vocabulary, below the full KL otherwise (simulated: 3-70% of it on peaked distributions)."""
    shared = [t for t in p_top if t in q_top]
    missing = [t for t in p_top if t not in q_top]
    lp, lq = np.array([p_top[t] for t in shared]), np.array([q_top[t] for t in shared])
    kl = float(np.sum(np.exp(lp) * (lp - lq)))
    q_missing = 0.0
    if missing:  # a quantized model that ranks the reference's tokens low shows here (disjoint lists: not 0)
        p_missing = sum(math.exp(p_top[t]) for t in missing)
        q_listed = sum(math.exp(v) for v in q_top.values())
        q_missing = min(len(missing) * math.exp(min(q_top.values(), default=0.0)), max(1.0 - q_listed, _TINY))
        kl += p_missing * (math.log(p_missing) - math.log(max(q_missing, _TINY)))
    p_rest = 1.0 - sum(math.exp(v) for v in p_top.values())
    q_rest = 1.0 - float(np.exp(lq).sum()) - q_missing
    if p_rest > _TINY:  # rounding can leave a hair of "rest" when the top-k holds everything
        kl += p_rest * (math.log(p_rest) - math.log(max(q_rest, _TINY)))
    return max(kl, 0.0)


def compare(reference: Sequence[Sequence[Row]], quantized: Sequence[Sequence[Row]]) -> QuantMeasurement:
    """reference / quantized: per text, per position, what finetune.serve.llamacpp.scored_logprobs returns."""
    kls, agree, ref_nll, q_nll = [], 0, [], []
    for ref_rows, q_rows in zip(reference, quantized, strict=True):
        for (ref_lp, ref_top), (q_lp, q_top) in zip(ref_rows, q_rows, strict=True):
            kls.append(position_kl(ref_top, q_top))
            agree += bool(ref_top and q_top and max(ref_top, key=ref_top.get) == max(q_top, key=q_top.get))
            if ref_lp is not None and q_lp is not None and min(ref_lp, q_lp) > MASKED:
                ref_nll.append(-ref_lp)
                q_nll.append(-q_lp)
    if not kls:
        raise ValueError("no positions to compare: every held-out text was shorter than two tokens")
    ref_mean, q_mean = (float(np.mean(x)) if x else math.nan for x in (ref_nll, q_nll))
    return QuantMeasurement(
        kl_mean=float(np.mean(kls)),
        kl_p99=float(np.percentile(kls, 99)),
        top1=agree / len(kls),
        ppl_ratio=_exp(q_mean - ref_mean),
        positions=len(kls),
        scored=len(ref_nll),
        reference_ppl=_exp(ref_mean),
        quantized_ppl=_exp(q_mean),
    )


def _exp(x: float) -> float:
    return math.exp(x) if x < 700 else math.inf  # NaN stays NaN


def measure_quantized(
    reference_gguf: Path,
    quantized_gguf: Path,
    token_ids: Sequence[Sequence[int]],
    *,
    score: Callable[..., list[list[Row]]] | None = None,
    k: int = TOP_K,
    reference_rows: list[list[Row]] | None = None,
) -> QuantMeasurement:
    """Both GGUFs scored by llama.cpp on every text in token_ids (the reference's rows may be given: measured
    before on the same bytes and texts), then compared."""
    if score is None:
        from finetune.serve.llamacpp import scored_logprobs as score
    if reference_rows is None:
        reference_rows = score(reference_gguf, token_ids, k=k)
    return compare(reference_rows, score(quantized_gguf, token_ids, k=QUANTIZED_K))


def rows_from_json(rows: list) -> list[list[Row]]:
    """Rows read back from JSON (ids are string keys there)."""
    return [[(lp, {int(t): v for t, v in top.items()}) for lp, top in text] for text in rows]
