"""Data-parallel training on local ranks: the release profile on 1 and 2 ranks side by side (equal settings).

Each run is the real `finetune train` (training.ranks=N), one after the other, on the same prepared data.
Figures: tokens/s of each (steady steps), the speedup and scaling efficiency, the largest per-step loss gap
between them (the same maths in another order), the time one gradient all_sum takes between 2 ranks (measured
by bench/allsum_child.py with MLX's ring backend on 127.0.0.1), and the bound on the speedup that the batch
itself sets: one rank's step at the whole batch over its step at half the batch (each of 2 ranks computes half;
work that does not shrink with the rows, such as reading every weight, is paid by both).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

from bench.stats import Figure, Goal, Section, intervals, median, ratio, steady

WARMUP = 3
ROOT = Path(__file__).resolve().parents[1]


def _train(work: Path, name: str, model: str, profile: str, sets: list[str], log) -> Path:
    run_dir = work / name
    shutil.rmtree(run_dir, ignore_errors=True)  # this code's run, never an older bench's
    args = [sys.executable, "-m", "finetune.cli", "train", "--run-dir", str(run_dir), "--profile", profile,
            "--set", f"model.name={model}", *[a for s in sets for a in ("--set", s)], "--quiet"]  # fmt: skip
    log(f"[ranks] {name}: finetune train {' '.join(sets)}")
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=1800)
    if done.returncode != 0:
        raise RuntimeError(f"{name}: exit {done.returncode}: {done.stdout[-800:]} {done.stderr[-800:]}")
    return run_dir


def _rows(run_dir: Path) -> list[dict]:
    lines = (run_dir / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == "train"]


def step_seconds(run_dir: Path) -> float | None:
    return median(steady(intervals([r["time"] for r in _rows(run_dir)]), WARMUP))


def tokens_per_second(run_dir: Path) -> float | None:
    rows = steady(_rows(run_dir), WARMUP)
    if len(rows) < 2:
        return None
    return (rows[-1]["trained_tokens"] - rows[0]["trained_tokens"]) / (rows[-1]["time"] - rows[0]["time"])


def loss_gap(a: Path, b: Path) -> float | None:
    la, lb = [r["train_loss"] for r in _rows(a)], [r["train_loss"] for r in _rows(b)]
    if len(la) != len(lb) or not la:
        return None
    return max(abs(x - y) / max(abs(x), 1e-12) for x, y in zip(la, lb, strict=True))


def allsum_ms(floats: int, timeout: float = 300) -> float:
    """Median ms of one all_sum of `floats` float32 between 2 local ranks (ring backend, 127.0.0.1)."""
    import tempfile

    from finetune.train.ranks import free_ports, local_hostfile, rank_env

    with tempfile.TemporaryDirectory() as tmp:
        hosts = local_hostfile(Path(tmp), free_ports(2))
        cmd = [sys.executable, "-m", "bench.allsum_child", str(floats)]
        procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, text=True,
                                  env={**os.environ, **rank_env(r, 2, hosts)})
                 for r in range(2)]  # fmt: skip
        outs = [p.communicate(timeout=timeout)[0] for p in procs]
    return float(json.loads(outs[0].strip().splitlines()[-1])["median_ms"])


def run_section(
    work: Path, model: str, profile: str = "release", iters: int = 40, log: Callable[[str], None] = print
) -> Section:
    s = Section("ranks", f"Data-parallel training: 1 vs 2 local ranks ({model}, {profile} profile)")
    work.mkdir(parents=True, exist_ok=True)
    base = [f"training.iters={iters}", f"training.eval_every={iters}", f"training.save_every={iters}"]
    one = _train(work, "ranks-1", model, profile, [*base, "training.ranks=1"], log)
    two = _train(work, "ranks-2", model, profile, [*base, "training.ranks=2"], log)
    cfg = json.loads((one / "stages" / "train.json").read_text())
    batch = json.loads((one / "report.json").read_text())["config"]["training"]["batch_size"]
    half = _train(
        work, "ranks-1-half-batch", model, profile, [*base, f"training.batch_size={batch // 2}"], log
    )
    tps1, tps2 = tokens_per_second(one), tokens_per_second(two)
    speedup = ratio(tps2, tps1)
    bound = ratio(step_seconds(one), step_seconds(half))
    params = cfg["details"].get("trainable_params") or 0
    comm = allsum_ms(params) if params else None
    s.add(Figure("ranks.tps_1", "1 rank: tokens/s", tps1, "tok/s"))
    s.add(Figure("ranks.tps_2", "2 local ranks: tokens/s", tps2, "tok/s"))
    why = (f"the batch itself bounds it at {bound:.2f}x: one rank's step at half the batch takes "
           f"{1 / bound:.0%} of its step at the whole batch (see ranks.bound)") if bound else ""  # fmt: skip
    s.add(Figure("ranks.speedup", "2 ranks / 1 rank tokens/s", speedup, "x", Goal(">=", 1.8, "≥ 1.8x"),
                 detail=f"scaling efficiency {speedup / 2:.0%}" if speedup else "",
                 reason=why if speedup is not None and speedup < 1.8 else ""))  # fmt: skip
    s.add(Figure("ranks.bound", f"bound set by the batch: 1-rank step at batch {batch} / at {batch // 2}",
                 bound, "x", detail="each rank computes half the rows; per-step work that does not shrink "
                 "with the rows is paid by every rank"))  # fmt: skip
    s.add(Figure("ranks.step_s", "2 ranks: median step", step_seconds(two), "s",
                 detail=f"1 rank: {step_seconds(one):.3f} s; 1 rank at half the batch: {step_seconds(half):.3f} s"))  # fmt: skip
    s.add(Figure("ranks.allsum_ms", f"one gradient all_sum ({params:,} float32) between 2 ranks", comm, "ms",
                 detail="MLX ring backend on 127.0.0.1; mlx-lm packs every gradient into one all_sum per step"))  # fmt: skip
    s.add(Figure("ranks.loss_gap", "largest per-step relative loss gap, 2 vs 1 rank", loss_gap(one, two), "",
                 detail="the same maths summed in another order"))  # fmt: skip
    return s
