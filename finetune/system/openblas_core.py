"""Which OpenBLAS kernel this CPU should run: OpenBLAS's own choice, asked in a child, and the override when it
fell back to a generic kernel on a CPU with AVX2 or AVX-512 (finetune.system.blas sets it as OPENBLAS_CORETYPE).

Debian's 0.3.21 does not know Sapphire Rapids and picked Prescott: 16 GFLOP/s instead of 86-91 with
Cooperlake (measured).
"""

from __future__ import annotations

import os
import sys

# OpenBLAS DYNAMIC_ARCH kernels without AVX2: what it falls back to for a CPU model it does not know.
GENERIC_CORES = {
    "prescott",
    "core2",
    "penryn",
    "dunnington",
    "nehalem",
    "atom",
    "katmai",
    "coppermine",
    "northwood",
    "banias",
    "opteron",
    "opteron_sse3",
    "barcelona",
    "bobcat",
    "sandybridge",
}


def wanted_core(flags: set[str]) -> str | None:
    """The widest OpenBLAS 0.3.21 kernel these CPU flags can run (None: leave OpenBLAS's own choice)."""
    if {"avx512f", "avx512bw", "avx512vl", "avx512dq"} <= flags:
        return "Cooperlake" if "avx512_bf16" in flags else "SkylakeX"
    if {"avx2", "fma"} <= flags:
        return "Haswell"
    return None


def core_override(detected: str | None, flags: set[str]) -> str | None:
    """OPENBLAS_CORETYPE to set when OpenBLAS's own detection fell back to a generic kernel (pure)."""
    wanted = wanted_core(flags)
    if wanted is None or detected is None or detected.lower() not in GENERIC_CORES:
        return None  # a known CPU (Zen, Haswell, SkylakeX...) keeps OpenBLAS's own pick
    return wanted


def cpu_flags(path: str = "/proc/cpuinfo") -> set[str]:
    """The first CPU's feature flags from /proc/cpuinfo (empty when unreadable)."""
    try:
        with open(path) as fh:
            flags = next((line for line in fh if line.startswith("flags")), None)
    except OSError:
        return set()
    return set(flags.split(":", 1)[1].split()) if flags else set()


def detected_core(library: str, timeout: float = 20.0) -> str | None:
    """The kernel OpenBLAS picks on its own, asked in a child (its choice is fixed once it loads here)."""
    import subprocess

    code = (
        "import ctypes, sys; lib = ctypes.CDLL(sys.argv[1]); "
        "lib.openblas_get_corename.restype = ctypes.c_char_p; print(lib.openblas_get_corename().decode())"
    )
    env = {k: v for k, v in os.environ.items() if k != "OPENBLAS_CORETYPE"}
    try:
        cmd = [sys.executable, "-S", "-c", code, library]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=env)
    except (OSError, subprocess.SubprocessError):
        return None
    return (done.stdout.strip() or None) if done.returncode == 0 else None
