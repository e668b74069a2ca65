"""Roofline: the FLOPs a release-profile training step really executes per second, against this machine's matmul.

Each model runs in a child (bench/step_profile.py): FineTune's real training setup with a profiling trainer
injected, so the step is the product's own (shortcuts included). The child also measures, in the same process
and minute, MLX's 1024² float32 matmul and the step's own matmul shapes (about a hundred token rows through the
blocks, a few dozen loss positions through the head), so "how close to the machine" is judged against both the
best case and what these shapes can reach. Phases: data, forward, backward, optimizer; the one-off prefix cost
is paid before step 1 and shown per step over the profile's iterations.
"""

from __future__ import annotations

import json
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.stats import Figure, Goal, Section, median, ratio
from bench.step_profile import Shapes, step_flops

ROOT = Path(__file__).resolve().parents[1]
WARMUP = 2
PHASES = ("data", "forward", "backward", "optimizer")


def profile(model: str, profile_name: str, steps: int, sets: list[str] = (), timeout: float = 1200) -> dict:
    args = [sys.executable, "-m", "bench.step_profile", model, profile_name, str(steps)]
    args += [a for s in sets for a in ("--set", s)]
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=timeout)
    if done.returncode != 0:
        raise RuntimeError(f"step_profile {model}: exit {done.returncode}: {done.stderr[-1500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def summarize(p: dict[str, Any], warmup: int = WARMUP) -> dict[str, Any]:
    """Medians over the steady steps: seconds per phase and per whole step, GFLOP per step, GFLOP/s (pure)."""
    shapes = Shapes(**p["shapes"])
    steps = p["steps"][warmup:] or p["steps"]
    flops = [step_flops(shapes, s["rows"], s["width"], s["head_rows"], s["prefix"]) for s in steps]
    total = [(f["forward"] + f["backward"]) / 1e9 for f in flops]
    out = {phase: median([s[phase] for s in steps]) for phase in (*PHASES, "step")}
    out["gflop"] = median(total)
    out["head_share"] = median([f["head"] / (f["forward"] + f["backward"]) for f in flops])
    out["achieved"] = median([g / s["step"] for g, s in zip(total, steps, strict=True)])
    out["peak"] = p.get("peak_gflops")
    out["shape_peak"] = (p.get("shape_gflops") or {}).get("weighted")
    out["fraction"] = ratio(out["achieved"], out["peak"])
    out["of_shape_peak"] = ratio(out["achieved"], out["shape_peak"])
    once = p.get("prefix_once_s")
    out["prefix_per_step"] = once / p["iters"] if once is not None and p.get("iters") else None
    head_speed = next(
        (v for k, v in (p.get("shape_gflops") or {}).items() if k.endswith(f"x{shapes.vocab}")), None
    )
    head = median([f["head"] for f in flops])
    out["head_s"] = head / (head_speed * 1e9) if head and head_speed else None
    out["tokens"] = median([s["rows"] * s["width"] for s in steps])
    out["head_rows"] = median([s["head_rows"] for s in steps])
    return out


def _figures(s: Section, model: str, m: dict[str, Any], goal: bool, profile_name: str) -> None:
    key = f"roofline.{model}"
    s.add(Figure(f"{key}.gflop", f"{model}: matmul GFLOP per {profile_name}-profile step (shortcuts on)", m["gflop"], "GFLOP",
                 detail=f"counted from each step's shapes: ~{m['tokens']:.0f} token rows through the trained blocks, "
                 f"{m['head_rows']:.0f} loss positions through the head ({m['head_share']:.0%} of the FLOPs"
                 + (f", ~{1e3 * m['head_s']:.0f} ms of the step at its shape's speed" if m["head_s"] else "") + ")"))  # fmt: skip
    reason = ""
    if goal and m["fraction"] is not None and m["fraction"] < 0.5:
        reason = (f"short of 0.5 by {0.5 - m['fraction']:.2f}: the step's own matmul shapes reach {m['shape_peak']:.0f} GFLOP/s, not {m['peak']:.0f}: "
                  f"~{m['tokens']:.0f} rows per weight (and {m['head_rows']:.0f} for the head) are too few to amortise "
                  f"streaming and packing each weight matrix; the step runs at {m['of_shape_peak']:.0%} of that "
                  "ceiling, the rest is non-matmul work (norms, RoPE, softmax, the cross-entropy, Adam)")  # fmt: skip
    s.add(Figure(f"{key}.achieved", f"{model}: executed GFLOP/s in a {profile_name}-profile step", m["achieved"], "GFLOP/s",
                 detail=f"median step {m['step']:.3f} s"))  # fmt: skip
    s.add(Figure(f"{key}.fraction", f"{model}: executed / 1024² matmul GFLOP/s (same process)", m["fraction"],
                 "x", Goal(">=", 0.5, "≥ 0.5") if goal else None, reason=reason,
                 detail=f"1024² float32 matmul {m['peak']:.0f} GFLOP/s; at the step's own shapes "
                 f"{m['shape_peak']:.0f} GFLOP/s, of which the step reaches {m['of_shape_peak']:.0%}"))  # fmt: skip


def _phase_row(model: str, m: dict[str, Any]) -> list[str]:
    cells = [f"{1e3 * m[p]:.0f} ({m[p] / m['step']:.0%})" for p in PHASES]
    per = m["prefix_per_step"]
    return [model, *cells, f"{1e3 * sum(m[p] for p in PHASES):.0f}", f"{1e3 * m['step']:.0f}",
            f"{1e3 * per:.1f}" if per is not None else "—"]  # fmt: skip


def build(profiles: dict[str, dict[str, Any]], goal_model: str, profile_name: str = "release") -> Section:
    """The section from the children's outputs (pure)."""
    s = Section(
        "roofline", f"Roofline: executed FLOPs per second and where a {profile_name}-profile step's time goes"
    )
    rows = []
    for model, p in profiles.items():
        m = summarize(p)
        _figures(s, model, m, model == goal_model, profile_name)
        rows.append(_phase_row(model, m))
        s.data[model] = {"summary": m, "profile": p}
        said = [ln for ln in p.get("shortcuts", []) if ln.startswith(("exact training", "- loss positions"))]
        said = [ln.removeprefix("- ") for ln in said]
        s.notes.append(f"{model}: " + "; ".join(said))
    s.table(["model", *(f"{p} ms (% of step)" for p in PHASES), "phases ms", "whole step ms",
             "prefix, once, per step ms"], rows, title="Median phase times per step")  # fmt: skip
    s.notes.append(
        "Phases are timed one evaluation each (backward = loss and gradients less the forward alone); the whole "
        "step is then timed once more as mlx-lm runs it, in one evaluation, on the same batch. FLOPs count matmuls "
        "only: attention as MLX computes it (the full square, masked), input gradients through the frozen base "
        "and head, weight gradients for LoRA."
    )
    return s


def run_section(
    models: list[str], profile_name: str = "release", steps: int = 16, sets: list[str] = (),
    log: Callable[[str], None] = print,
) -> Section:  # fmt: skip
    profiles = {}
    for model in models:
        log(f"[roofline] {model}: profiling {steps} {profile_name}-profile steps")
        profiles[model] = profile(model, profile_name, steps, sets)
    return build(profiles, models[0], profile_name)
