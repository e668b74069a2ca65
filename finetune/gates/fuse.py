"""The fuse-exactness gate: the fused folder is exactly base + the adapter's delta, and nothing else changed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field

from finetune.gates.verdict import Verdict, verdict


@dataclass
class FuseMeasurement:
    """From the fused folder, the base and the saved adapter on disk (export.fuse_check measures it)."""

    adapted: dict[str, float]  # module -> max|fused - (base + scale * B^T A^T)| / max|delta|
    deltas: dict[str, float]  # module -> max|delta|, for context
    untouched_changed: list[str]  # tensors outside the adapted modules that are not bitwise equal
    missing: list[str] = field(
        default_factory=list
    )  # in the base but not in the fused folder, or the reverse
    untouched_total: int = 0


def fuse_exactness(m: FuseMeasurement, *, max_rel: float) -> Verdict:
    name = "fuse_exactness"
    problems = []
    if not m.adapted:
        problems.append("no adapted module found in the adapter")
    worst_name, worst = max(m.adapted.items(), key=lambda kv: kv[1], default=("-", 0.0))
    if worst > max_rel:
        bad = sorted(k for k, v in m.adapted.items() if v > max_rel)
        problems.append(
            f"{len(bad)} adapted weights are not base + delta (worst {worst_name}: relative error "
            f"{worst:.3g} > {max_rel:g})"
        )
    if m.untouched_changed:
        problems.append(
            f"{len(m.untouched_changed)} untouched tensors changed (e.g. {m.untouched_changed[0]})"
        )
    if m.missing:
        problems.append(f"tensor sets differ: {m.missing[:3]}")
    detail = (
        f"{len(m.adapted)} adapted weights within relative error {worst:.2g} of base + delta; "
        f"{m.untouched_total - len(m.untouched_changed)}/{m.untouched_total} other tensors bitwise equal"
    )
    if problems:
        detail += ": " + "; ".join(problems)
    data: Mapping = {
        "worst": worst_name,
        "untouched_changed": m.untouched_changed[:20],
        "missing": m.missing[:20],
    }
    return verdict(name, not problems, worst, max_rel, detail, dict(data))
