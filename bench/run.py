"""`make bench`: BLAS, training throughput, peak memory, tier wall times and inference speed on this machine.

    python -m bench.run            # full run, SmolLM2-135M; writes docs/benchmarks.md and .json
    python -m bench.run --quick    # tiny-llama, fewer reps; writes artifacts/bench-quick/
    python -m bench.run --tiers    # also run tiers 2 and 3 live instead of reading their last reports

Every section runs even if another failed; a failed section is reported with its error.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import finetune  # noqa: F401  (OpenBLAS before any mlx import, and the same thread defaults as training)
from bench import blas_bench, inference, memory_bench, ranks_bench, report, roofline, tiers, training
from bench.stats import Figure, Goal, Section

ROOT = Path(__file__).resolve().parents[1]
BENCH_BUDGET_S = 900.0  # `make bench` on a fresh clone in under 15 minutes
SECTIONS = ("blas", "training", "roofline", "ranks", "memory", "tiers", "inference")


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "?"


def _git(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)


def git_commit() -> str | None:
    try:
        out = _git("rev-parse", "--short", "HEAD")
        dirty = _git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.SubprocessError):
        return None
    if out.returncode != 0:
        return None
    return out.stdout.strip() + (" (with uncommitted changes)" if dirty.stdout.strip() else "")


def metadata(mode: str) -> dict:
    from finetune.system import doctor
    from finetune.system.resources import total_memory_bytes

    versions = {"python": platform.python_version(), "finetune": finetune.__version__}
    versions |= {name: doctor.package_version(name) for name in doctor.PACKAGES}
    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "mode": mode,
        "commit": git_commit(),
        "machine": {
            "cpu_model": cpu_model(),
            "cpu_count": os.cpu_count(),
            "memory_total_bytes": total_memory_bytes(),
            "platform": platform.platform(),
            "python": platform.python_version(),
            "loadavg_start": loadavg(),
            "env": {k: os.environ.get(k) for k in doctor.THREAD_VARS},
        },
        "versions": versions,
    }


def guarded(key: str, title: str, fn: Callable[[], Section], log: Callable[[str], None]) -> Section:
    log(f"[{key}] ...")
    tic = time.perf_counter()
    try:
        s = fn()
    except Exception as exc:  # a failed section is reported, the others still run
        s = Section(key, title, error=f"{type(exc).__name__}: {exc}")
        s.data["traceback"] = traceback.format_exc()[-4000:]
        log(f"[{key}] FAILED: {s.error}")
    s.seconds = time.perf_counter() - tic
    log(f"[{key}] done in {s.seconds:.0f} s")
    return s


def build_plan(
    args: argparse.Namespace, work: Path, log: Callable[[str], None]
) -> list[tuple[str, str, Callable]]:
    quick = args.quick
    model = "tiny-llama" if quick else args.model
    overrides = ["lora.num_layers=-1"] if quick else []
    # tiny-llama has 2 blocks: adapters on the top one keep the frozen-prefix shortcut in play.
    train_overrides = ["lora.num_layers=1"] if quick else []
    shared: dict = {}

    def blas() -> Section:
        s = blas_bench.run_section(quick)
        shared["mlx_gflops"] = next((f.value for f in s.figures if f.key == "blas.mlx_gflops"), None)
        return s

    def train() -> Section:
        return training.run_section(
            work / "training",
            model_spec=model,
            profile=args.profile,
            iters=args.iters or (5 if quick else 8),
            warmup=1 if quick else 2,
            rounds=args.rounds or (1 if quick else 2),
            overrides=train_overrides,
            release_epochs=args.release_epochs or (1 if quick else None),
            release_rounds=args.release_rounds or 1,
            release_warmup=1 if quick else 2,
            peft_threads=args.peft_threads,
            matmul_gflops=shared.get("mlx_gflops"),
            log=log,
        )

    def ranks() -> Section:
        profile = args.profile if quick else "release"  # the goal is the release profile's
        return ranks_bench.run_section(work / "ranks", model, profile, iters=12 if quick else 40, log=log)

    def roof() -> Section:
        if quick:
            return roofline.run_section([model], args.profile, steps=4, sets=train_overrides, log=log)
        return roofline.run_section([model, "gemma3-270m"], "release", steps=16, log=log)

    def memory() -> Section:
        return memory_bench.run_section(
            work / "memory", args.profile, model, overrides, steps=2 if quick else 3, log=log
        )

    def infer() -> Section:
        from finetune.models.resolve import resolve_model

        path = Path(resolve_model(model).path)
        max_tokens, reps = (16, 1) if quick else (64, 3)
        return inference.run_section(
            work / "inference", path, model, max_tokens=max_tokens, reps=reps, log=log
        )

    def tier_times() -> Section:
        return tiers.run_section(ROOT / "artifacts", live_slow=args.tiers, quick=quick, log=log)

    plan = [
        ("blas", "BLAS: MLX matmul vs numpy", blas),
        ("training", "Training throughput", train),
        ("roofline", "Roofline", roof),
        ("ranks", "Data-parallel training", ranks),
        ("memory", "Peak training memory", memory),
        ("tiers", "Test tiers", tier_times),
        ("inference", "Inference", infer),
    ]
    only = {x for x in (args.only or "").split(",") if x}
    return [p for p in plan if not only or p[0] in only]


def self_timing(seconds: float, quick: bool) -> Section:
    """The bench's own wall time against the 15-minute budget for `make bench` (BENCH_BUDGET_S)."""
    s = Section("bench", "This benchmark run")
    label = "`python -m bench.run` wall time" + (" (--quick)" if quick else "")
    budget = Goal("<=", BENCH_BUDGET_S, f"≤ {BENCH_BUDGET_S:g} s")
    detail = "a fresh clone adds `make setup` and the one-time SmolLM2 conversion (~30 s)"
    s.add(Figure("bench.seconds", label, seconds, "s", budget, detail=detail))
    s.seconds = 0.0
    return s


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="tiny-llama, fewer reps, for tests")
    p.add_argument("--tiers", action="store_true", help="run tiers 2 and 3 live (adds 5-20 min)")
    p.add_argument("--only", help=f"comma-separated sections: {','.join(SECTIONS)}")
    p.add_argument("--out", help="output folder (default docs/, or artifacts/bench-quick with --quick)")
    p.add_argument("--work", help="scratch folder (default artifacts/bench-work[-quick])")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--profile", default="quick", help="the FineTune profile whose settings are benchmarked")
    p.add_argument("--iters", type=int, help="equal-settings training steps per run (default 8; quick 5)")
    p.add_argument("--peft-threads", type=int, help="torch threads for peft (default: OPENBLAS_NUM_THREADS)")
    p.add_argument(
        "--rounds", type=int, help="interleaved equal-settings training rounds (default 2; quick 1)"
    )
    p.add_argument(
        "--release-epochs",
        type=int,
        help="epochs of the release data per release-profile run (default: the profile's own training.iters; quick 1)",
    )
    p.add_argument("--release-rounds", type=int, help="interleaved release-profile rounds (default 1)")
    args = p.parse_args(argv)
    mode = "quick" if args.quick else "full" + (" + live tiers 2/3" if args.tiers else "")
    out = Path(args.out) if args.out else ROOT / ("artifacts/bench-quick" if args.quick else "docs")
    work = (
        Path(args.work)
        if args.work
        else ROOT / ("artifacts/bench-work-quick" if args.quick else "artifacts/bench-work")
    )
    work.mkdir(parents=True, exist_ok=True)

    def log(message: str) -> None:
        print(message, file=sys.stderr, flush=True)

    tic = time.perf_counter()
    meta = metadata(mode)
    sections = [guarded(key, title, fn, log) for key, title, fn in build_plan(args, work, log)]
    meta["seconds"] = round(time.perf_counter() - tic, 1)
    sections.append(self_timing(meta["seconds"], args.quick))
    meta["machine"]["loadavg_end"] = loadavg()
    md, js = report.write(out, meta, sections)
    print(f"wrote {md} and {js} in {meta['seconds']:.0f} s")
    for row in report.summary_rows(sections):
        print("  " + " | ".join(row))
    return 1 if any(s.error for s in sections) else 0


if __name__ == "__main__":
    raise SystemExit(main())
