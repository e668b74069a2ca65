"""BLAS: MLX matmul GFLOP/s through the project's install vs numpy in the same process, and stock mlx-cpu.

Each figure comes from a child process (`python -m bench.blas_bench`), so the stock run can start with
FT_BLAS_DISABLE=1 (MLX keeps the reference BLAS bundled in its wheel). Inside a child, MLX and numpy
matmuls alternate rep by rep, so a busy neighbour slows both alike and their ratio stays meaningful.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import finetune  # noqa: F401  (loads OpenBLAS before any mlx import in this process)
from bench.stats import Figure, Goal, Section, median, ratio
from finetune.system import doctor
from finetune.system.blas import gflops

N = 1024


def measure(n: int = N, reps: int = 5, budget_s: float = 0.4) -> dict:
    import mlx.core as mx
    import numpy as np

    from finetune.system.blas import active_blas

    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    mx.eval(a, b)
    an = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    bn = np.random.default_rng(1).standard_normal((n, n), dtype=np.float32)
    mlx_runs, np_runs = [], []
    for _ in range(reps):
        mlx_runs.append(gflops(lambda: mx.eval(a @ b), n, budget_s, max_reps=200))
        np_runs.append(gflops(lambda: an @ bn, n, budget_s, max_reps=200))
    blas = active_blas()
    return {
        "n": n,
        "mlx_gflops": mlx_runs,
        "numpy_gflops": np_runs,
        "ratios": [m / p for m, p in zip(mlx_runs, np_runs, strict=True)],
        "active_blas": blas.name,
        "library": blas.path,
        "openblas_threads": os.environ.get("OPENBLAS_NUM_THREADS"),
    }


def run_child(env_extra: dict[str, str], n: int, reps: int, budget_s: float, timeout: float = 300) -> dict:
    env = {**os.environ, **env_extra}
    cmd = [
        sys.executable,
        "-m",
        "bench.blas_bench",
        "--n",
        str(n),
        "--reps",
        str(reps),
        "--budget",
        str(budget_s),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=timeout)
    if proc.returncode != 0:
        raise RuntimeError(
            f"blas child ({env_extra or 'project'}) exited {proc.returncode}: {proc.stderr[-1500:]}"
        )
    return json.loads(proc.stdout.strip().splitlines()[-1])


def summarize(project: dict, stock: dict | None) -> Section:
    """Figures from the children's raw measurements (pure)."""
    s = Section("blas", "BLAS: MLX matmul vs numpy")
    mlx, npy, r = median(project["mlx_gflops"]), median(project["numpy_gflops"]), median(project["ratios"])
    n = project["n"]
    in_use = f"BLAS in use: {project['active_blas']} ({project['library'] or '-'})"
    threads = f"OPENBLAS_NUM_THREADS={project['openblas_threads']}"
    label = f"MLX {n}² f32 matmul (project install)"
    s.add(Figure("blas.mlx_gflops", label, mlx, "GFLOP/s", detail=f"{in_use}, {threads}"))
    s.add(Figure("blas.numpy_gflops", f"numpy {n}² f32 matmul (same process)", npy, "GFLOP/s"))
    not_slow = Goal(">=", doctor.SLOW_RATIO, f"≥ {doctor.SLOW_RATIO} (finetune doctor's 'not slow' line)")
    label = "MLX / numpy matmul speed (same process)"
    detail = "median of per-rep ratios, MLX and numpy reps alternating"
    fig = s.add(Figure("blas.mlx_over_numpy", label, r, "×", not_slow, detail=detail))
    if fig.met is False:
        fig.reason = f"MLX is on the {project['active_blas']} BLAS, not OpenBLAS: see `finetune doctor`."
    rows = [["project (OpenBLAS preloaded)", f"{mlx:.1f}", f"{npy:.1f}", f"{r:.2f}"]]
    if stock:
        smlx, snp = median(stock["mlx_gflops"]), median(stock["numpy_gflops"])
        label = f"stock mlx-cpu {n}² f32 matmul (reference BLAS)"
        detail = f"FT_BLAS_DISABLE=1 child; BLAS in use: {stock['active_blas']}"
        s.add(Figure("blas.stock_mlx_gflops", label, smlx, "GFLOP/s", detail=detail))
        s.add(Figure("blas.speedup", "project MLX / stock MLX matmul speed", ratio(mlx, smlx), "×"))
        rows.append(
            [
                "stock mlx-cpu (FT_BLAS_DISABLE=1)",
                f"{smlx:.1f}",
                f"{snp:.1f}",
                f"{median(stock['ratios']):.2f}",
            ]
        )
    s.table(["install", "MLX GFLOP/s", "numpy GFLOP/s", "MLX/numpy"], rows)
    s.data = {"project": project, "stock": stock}
    return s


def run_section(quick: bool = False) -> Section:
    reps, budget = (3, 0.2) if quick else (5, 0.4)
    project = run_child({}, N, reps, budget)
    stock = None
    stock_error = None
    try:  # the reference BLAS does ~2 GFLOP/s: fewer, single-matmul reps
        stock = run_child({"FT_BLAS_DISABLE": "1"}, N, 3 if not quick else 2, 0.5)
    except (RuntimeError, subprocess.TimeoutExpired) as exc:
        stock_error = str(exc)
    s = summarize(project, stock)
    if stock_error:
        s.notes.append(f"stock figure not measured: {stock_error}")
    return s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--n", type=int, default=N)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--budget", type=float, default=0.4)
    a = p.parse_args(argv)
    print(json.dumps(measure(a.n, a.reps, a.budget)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
