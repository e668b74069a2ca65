"""Tier 2 gates. Each takes measurements (plain numbers and arrays) and returns a Verdict.

Measuring (training, generating, peak memory) lives elsewhere; these functions only judge, so each
can be shown to fail on a broken run and pass on a healthy one without a model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np


@dataclass
class Verdict:
    name: str
    passed: bool
    measured: float | None
    threshold: float | None
    detail: str
    data: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def __str__(self) -> str:
        mark = "PASS" if self.passed else "FAIL"
        return f"[{mark}] {self.name}: {self.detail}"


# ---------------------------------------------------------------- loss convergence


def read_metrics(path: Path) -> list[dict]:
    rows = []
    if not Path(path).exists():
        return rows
    for line in Path(path).read_text().splitlines():
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            continue  # a torn last line after a crash
    return rows


def train_losses(rows: Sequence[dict]) -> list[float]:
    return [r["train_loss"] for r in sorted(rows, key=lambda r: r["step"]) if r.get("kind") == "train"]


def loss_convergence(
    losses: Sequence[float],
    *,
    drop: float = 0.05,
    window: int = 5,
    max_initial: float | None = None,
    max_final: float | None = None,
) -> Verdict:
    """Final-window mean <= (1 - drop) x initial-window mean; windows, so one lucky step cannot pass."""
    name = "loss_convergence"
    losses = [float(x) for x in losses]
    if len(losses) < 2 * window:
        return Verdict(
            name, False, None, 1 - drop, f"need >= {2 * window} steps for two windows, got {len(losses)}"
        )
    if not all(np.isfinite(losses)):
        return Verdict(name, False, None, 1 - drop, "loss is NaN or infinite (diverged)")
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
    return Verdict(name, not problems, ratio, 1 - drop, detail, {"initial": first, "final": last})


# ---------------------------------------------------------------- model learning


def answer_score(answer: str, reference: str) -> int:
    """2 = exact, 1 = contains the reference as whole words, 0 = neither (see synthetic.score_answer)."""
    from finetune.synthetic import score_answer

    score = score_answer(answer, reference)
    return 2 if score["exact"] else int(score["contains"])


def model_learning(
    before: Sequence[str],
    after: Sequence[str],
    references: Sequence[str],
    *,
    loss_before: float,
    loss_after: float,
    threshold: float = 0.30,
) -> Verdict:
    """Trained answers beat the base's on > threshold of cases, and teacher-forced loss drops."""
    name = "model_learning"
    if not (len(before) == len(after) == len(references)) or not references:
        return Verdict(name, False, None, threshold, "answers and references differ in number or are empty")
    scores = [
        (answer_score(b, r), answer_score(a, r)) for b, a, r in zip(before, after, references, strict=True)
    ]
    wins = sum(1 for b, a in scores if a > b)
    share = wins / len(scores)
    ok_share, ok_loss = share > threshold, loss_after < loss_before
    detail = (
        f"improved on {wins}/{len(scores)} = {share:.0%} (need > {threshold:.0%}); "
        f"teacher-forced loss {loss_before:.4f} -> {loss_after:.4f}"
    )
    if not ok_loss:
        detail += " (did not drop)"
    cases = [
        {"reference": r, "before": b, "after": a, "before_score": sb, "after_score": sa}
        for (sb, sa), b, a, r in zip(scores, before, after, references, strict=True)
    ]
    return Verdict(name, ok_share and ok_loss, share, threshold, detail, {"cases": cases})


# ---------------------------------------------------------------- memory efficiency


def memory_efficiency(lora_peak: int, full_peak: int, *, saving: float = 0.30) -> Verdict:
    """LoRA's peak must be at least `saving` below full fine-tuning of the same model, batch and length."""
    name = "memory_efficiency"
    if full_peak <= 0 or lora_peak <= 0:
        return Verdict(name, False, None, saving, f"missing measurement (lora {lora_peak}, full {full_peak})")
    measured = 1 - lora_peak / full_peak
    detail = (
        f"LoRA peak {lora_peak / 2**20:.0f} MiB vs full {full_peak / 2**20:.0f} MiB: saving {measured:.1%}"
    )
    return Verdict(name, measured >= saving, measured, saving, detail + f" (need >= {saving:.0%})")


# ---------------------------------------------------------------- parameter updates


def parameter_updates(
    lora_before: Mapping[str, np.ndarray],
    lora_after: Mapping[str, np.ndarray],
    base_before: Mapping[str, np.ndarray],
    base_after: Mapping[str, np.ndarray],
    *,
    steps: int,
    threshold: float = 0.80,
    min_steps: int = 3,
) -> Verdict:
    """> threshold of LoRA elements changed (lora_b starts at zero, so B must move) and no base weight moved."""
    name = "parameter_updates"
    problems = []
    if steps < min_steps:
        problems.append(f"only {steps} steps (need >= {min_steps})")
    if not lora_before or set(lora_before) != set(lora_after):
        return Verdict(name, False, None, threshold, "no LoRA parameters, or the sets differ before/after")
    per_tensor, changed, total = {}, 0, 0
    for key, old in lora_before.items():
        diff = np.asarray(old) != np.asarray(lora_after[key])
        per_tensor[key] = float(diff.mean())
        changed, total = changed + int(diff.sum()), total + diff.size
    share = changed / total
    if share <= threshold:
        problems.append(f"only {share:.1%} of LoRA elements changed (need > {threshold:.0%})")
    moved = [k for k, v in base_before.items() if k not in base_after or not np.array_equal(v, base_after[k])]
    if moved:
        problems.append(f"{len(moved)} base weights changed (e.g. {moved[0]})")
    if not base_before:
        problems.append("no base weights to compare")
    frozen = sorted(k for k, v in per_tensor.items() if v == 0.0)
    detail = f"{share:.1%} of {total:,} LoRA elements changed; {len(moved)} base tensors moved"
    if frozen:
        detail += f"; {len(frozen)} LoRA tensors unchanged"
    if problems:
        detail += ": " + "; ".join(problems)
    return Verdict(
        name, not problems, share, threshold, detail, {"per_tensor": per_tensor, "base_moved": moved}
    )


# ---------------------------------------------------------------- artifacts

REQUIRED = ("config.yaml", "metrics.jsonl", "adapter/adapters.safetensors", "adapter/adapter_config.json")


def artifacts(
    run_dir: Path, *, load_adapter: Callable[[Path], Any] | None = None, require_summary=True
) -> Verdict:
    """The run's files exist, parse, and the adapter loads back (with `load_adapter`, e.g. mlx_lm.load)."""
    name = "artifacts"
    run_dir = Path(run_dir)
    required = [*REQUIRED, *(["summary.json"] if require_summary else [])]
    problems = [f"missing {rel}" for rel in required if not (run_dir / rel).is_file()]
    if not list((run_dir / "checkpoints").glob("step-*")):
        problems.append("no checkpoint under checkpoints/")
    for rel in ("adapter/adapter_config.json", "summary.json"):
        if (run_dir / rel).is_file():
            try:
                json.loads((run_dir / rel).read_text())
            except json.JSONDecodeError as exc:
                problems.append(f"{rel} is not valid JSON ({exc.msg})")
    if (run_dir / "metrics.jsonl").is_file() and not read_metrics(run_dir / "metrics.jsonl"):
        problems.append("metrics.jsonl has no rows")
    if load_adapter is not None and not problems:
        try:
            load_adapter(run_dir / "adapter")
        except Exception as exc:  # any load failure is the finding
            problems.append(f"adapter does not load: {type(exc).__name__}: {exc}")
    detail = "all present and loadable" if not problems else "; ".join(problems)
    return Verdict(name, not problems, float(len(problems)), 0.0, detail)
