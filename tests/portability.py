"""`make test-portability`: the exactness and parity tests under every BLAS kernel this CPU can run.

A tolerance tuned on one CPU fails on another (issue 17), so the tests measure their own noise floor
(tests/noise.py); this runner proves it by running them under each OpenBLAS kernel (OPENBLAS_CORETYPE, which
lets one machine use other CPUs' kernels) and MLX's own reference BLAS, and writes portability.md (artifacts/docs/; `make docs` publishes it) with
every (error, floor, k) they asserted. A kernel this CPU cannot execute (SkylakeX without AVX-512 dies on
SIGILL) is listed as not runnable here, with the missing flags; every runnable kernel must pass.

    python -m tests.portability [--kernels auto,Haswell,...] [pytest args...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path

from finetune.system.blas import cpu_flags
from tests import generated

ROOT = Path(__file__).resolve().parents[1]

# The tests whose figures depend on floating-point summation order.
TESTS = [
    "tests/unit/train/test_shortcuts.py",
    "tests/unit/train/test_shortcut_plan.py",
    "tests/unit/train/test_arch.py",
    "tests/unit/export/test_fuse.py",
    "tests/unit/evaluate/test_decode.py",
    "tests/unit/evaluate/test_runtimes.py",
]


@dataclass(frozen=True)
class Kernel:
    name: str
    env: dict[str, str]
    needs: frozenset[str] = frozenset()  # CPU flags its instructions need

    def missing(self, flags: set[str]) -> list[str]:
        return sorted(self.needs - flags)


AVX2 = frozenset({"avx", "avx2", "fma"})
KERNELS = [
    Kernel("auto", {}),  # OpenBLAS's own pick (finetune.system.blas may correct a generic one)
    Kernel("Haswell", {"OPENBLAS_CORETYPE": "Haswell"}, AVX2),
    Kernel(
        "SkylakeX", {"OPENBLAS_CORETYPE": "SkylakeX"}, AVX2 | {"avx512f", "avx512bw", "avx512vl", "avx512dq"}
    ),
    Kernel("Zen", {"OPENBLAS_CORETYPE": "Zen"}, AVX2),
    # /proc/cpuinfo calls SSE3 "pni"
    Kernel("Prescott", {"OPENBLAS_CORETYPE": "Prescott"}, frozenset({"pni"})),
    Kernel("reference", {"FT_BLAS_DISABLE": "1"}),  # the netlib BLAS inside MLX's wheel
]

PROBE = (
    "import ctypes, finetune\n"
    "from finetune.system.blas import active_blas\n"
    "a = active_blas()\n"
    "core = '-'\n"
    "if a.name == 'openblas':\n"
    "    lib = ctypes.CDLL(a.path); lib.openblas_get_corename.restype = ctypes.c_char_p\n"
    "    core = lib.openblas_get_corename().decode()\n"
    "print(a.name, core)\n"
)


@dataclass
class Outcome:
    kernel: str
    blas: str = "-"
    core: str = "-"
    status: str = "not run"  # passed / failed / not runnable here
    detail: str = ""
    seconds: float = 0.0
    checks: list[dict] = field(default_factory=list)


def kernel_env(k: Kernel) -> dict[str, str]:
    env = {key: v for key, v in os.environ.items() if key not in ("OPENBLAS_CORETYPE", "FT_BLAS_DISABLE")}
    return {**env, **k.env}


def probe(k: Kernel) -> tuple[str, str]:
    """(BLAS MLX really uses, OpenBLAS's core name) under this kernel's environment."""
    done = subprocess.run([sys.executable, "-c", PROBE], env=kernel_env(k), capture_output=True, text=True,
                          timeout=120, cwd=ROOT)  # fmt: skip
    if done.returncode != 0:
        raise RuntimeError(f"probe exited {done.returncode}: {done.stderr.strip()[-300:]}")
    blas, core = done.stdout.split()[-2:]
    return blas, core


def run_kernel(k: Kernel, flags: set[str], pytest_args: list[str]) -> Outcome:
    out = Outcome(k.name)
    if k.env and sys.platform != "linux":
        out.status, out.detail = (
            "not runnable here",
            "MLX uses Accelerate on macOS: no OpenBLAS kernels to pick",
        )
        return out
    if missing := k.missing(flags):
        out.status, out.detail = "not runnable here", f"this CPU lacks {', '.join(missing)} (SIGILL)"
        return out
    out.blas, out.core = probe(k)
    wanted = k.env.get("OPENBLAS_CORETYPE")
    if wanted and out.core.lower() != wanted.lower():
        out.status, out.detail = "failed", f"asked for {wanted}, OpenBLAS runs {out.core}"
        return out
    if k.name == "reference" and out.blas != "reference":
        out.status, out.detail = "failed", f"MLX runs {out.blas}, not its reference BLAS"
        return out
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "floors.jsonl"
        env = {**kernel_env(k), "FT_FLOOR_LOG": str(log)}
        cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *pytest_args, *TESTS]
        tic = time.perf_counter()
        done = subprocess.run(cmd, env=env, cwd=ROOT, capture_output=True, text=True)
        out.seconds = round(time.perf_counter() - tic, 1)
        summary = [line for line in done.stdout.splitlines() if " passed" in line or " failed" in line]
        out.detail = summary[-1].strip("= ") if summary else done.stdout.strip()[-300:]
        out.status = "passed" if done.returncode == 0 else "failed"
        if done.returncode != 0:
            print(done.stdout[-6000:], done.stderr[-2000:], sep="\n")
        if log.exists():
            out.checks = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return out


def render(outcomes: list[Outcome]) -> str:
    lines = [
        "<!-- Generated by `make test-portability` (tests/portability.py). Do not edit by hand: rerun it. -->",
        "",
        "# Portability: exactness and parity tests under every BLAS kernel",
        "",
        f"Machine: {platform.machine()} {platform.system()}, {os.cpu_count()} cores, "
        f"{datetime.now(UTC).isoformat(timespec='seconds')}. Tests: {', '.join(Path(t).name for t in TESTS)}.",
        "",
        "Each tolerance is k x a noise floor the test measures on this machine (tests/noise.py): the plain",
        "computation's own float32 rounding (its float64 twin, or another harmless summation order).",
        "",
        "| kernel | BLAS MLX uses | OpenBLAS core | result | seconds |",
        "|---|---|---|---|---|",
    ]
    lines += [
        f"| {o.kernel} | {o.blas} | {o.core} | {o.status}: {o.detail} | {o.seconds} |" for o in outcomes
    ]
    by_check: dict[str, list[tuple[str, dict]]] = {}
    for o in outcomes:
        for c in o.checks:
            by_check.setdefault(c["check"], []).append((o.kernel, c))
    faults = {name: rows for name, rows in by_check.items() if name.startswith("fault:")}
    if faults:
        lines += [
            "",
            "Planted faults (the test passes when the check FAILS), error in floors per kernel:",
            "",
        ]
        for name, rows in sorted(faults.items()):
            lines.append(f"- {name[6:].strip()}: " + ", ".join(f"{k} {c['ratio']:.0f}" for k, c in rows))
    by_check = {name: rows for name, rows in by_check.items() if name not in faults}
    lines += ["", "Per check, over the kernels above: the floor measured, the error, error/floor and k.", "",
              "| check | floor (min-max) | error (max) | worst error/floor (kernel) | k | margin |",
              "|---|---|---|---|---|---|"]  # fmt: skip
    for name, rows in sorted(by_check.items()):
        floors = [c["floor"] for _, c in rows]
        worst_kernel, worst = max(rows, key=lambda kc: kc[1]["ratio"])
        margin = worst["k"] / worst["ratio"] if worst["ratio"] else float("inf")
        lines.append(f"| {name} | {min(floors):.2g} - {max(floors):.2g} | {max(c['error'] for _, c in rows):.2g} | "
                     f"{worst['ratio']:.2f} ({worst_kernel}) | {worst['k']:g} | {margin:.1f}x |")  # fmt: skip
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--kernels", default=",".join(k.name for k in KERNELS))
    parser.add_argument("--doc", type=Path, default=generated.output("portability.md"))
    args, pytest_args = parser.parse_known_args(argv)
    wanted = args.kernels.split(",")
    unknown = set(wanted) - {k.name for k in KERNELS}
    if unknown:
        parser.error(f"unknown kernels {sorted(unknown)}")
    flags = cpu_flags()
    outcomes: list[Outcome] = []
    for k in (k for k in KERNELS if k.name in wanted):
        same = next((o for o in outcomes if o.status == "passed" and o.core.lower() == k.name.lower()), None)
        if same is not None:  # e.g. OpenBLAS's own pick on a Zen CPU is the Zen kernel: already run
            o = Outcome(
                k.name, same.blas, same.core, "passed", f"the same kernel as {same.kernel}, run above"
            )
        else:
            o = run_kernel(k, flags, pytest_args)
        print(
            f"[portability] {o.kernel}: {o.status} ({o.blas} {o.core}) {o.detail} in {o.seconds} s",
            flush=True,
        )
        outcomes.append(o)
    from finetune.system.atomic import atomic_write_text

    atomic_write_text(args.doc, render(outcomes))
    ran = [o for o in outcomes if o.status != "not runnable here"]
    bad = [o.kernel for o in ran if o.status != "passed"]
    print(f"[portability] {len(ran) - len(bad)} passed, {len(bad)} failed"
          + "".join(f"; {o.kernel} not runnable here: {o.detail}" for o in outcomes if o not in ran))  # fmt: skip
    return 1 if bad or not ran else 0


if __name__ == "__main__":
    sys.exit(main())
