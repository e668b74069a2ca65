"""`finetune doctor`: what this machine really runs (MLX device, BLAS in use, threads, versions, memory, disk).

collect() gathers facts into a plain dict (JSON-serialisable, for run logs); render() formats them.
The BLAS row comes from /proc/self/maps + load order (blas.active_blas), optionally confirmed by a measured
matmul, so it reports what MLX binds to, not what preload intended.
"""

from __future__ import annotations

import os
import platform
import shutil
import sys
from collections.abc import Callable
from pathlib import Path

from finetune.system import blas
from finetune.system.packages import package_version
from finetune.system.resources import available_memory_bytes, total_memory_bytes

PACKAGES = (
    "mlx",
    "mlx-cpu",
    "mlx-lm",
    "transformers",
    "torch",
    "gguf",
    "peft",
    "numpy",
    "ollama",
    "xllamacpp",
)
THREAD_VARS = (
    "OPENBLAS_NUM_THREADS",
    "MLX_DISABLE_COMPILE",
    "OMP_NUM_THREADS",
    "FT_BLAS_LIB",
    "FT_BLAS_DISABLE",
)
# MLX/numpy matmul speed ratio below this means MLX is on the reference BLAS (measured 0.03-0.1 vs 0.5-1.4).
SLOW_RATIO = 0.25


def _mlx_info() -> dict:
    try:
        import mlx.core as mx
    except ImportError as exc:
        return {"importable": False, "error": str(exc)}
    info: dict = {"importable": True, "version": getattr(mx, "__version__", None)}
    info["default_device"] = str(mx.default_device())
    try:
        info["metal_available"] = bool(mx.metal.is_available())
    except Exception:  # absent or deprecated on some builds: report, never fail doctor
        info["metal_available"] = False
    info["backend"] = "metal" if info["metal_available"] else "cpu"
    return info


def _disk_free(path: Path) -> dict:
    probe = Path(path)
    while not probe.exists() and probe != probe.parent:  # artifacts dir may not exist yet
        probe = probe.parent
    usage = shutil.disk_usage(probe)
    return {"path": str(path), "free_bytes": usage.free, "total_bytes": usage.total}


def collect(
    artifacts_dir: Path | str = "artifacts",
    *,
    measure: bool = True,
    speed: Callable[[], blas.MatmulSpeed] = blas.measure_matmul,
) -> dict:
    """Facts about this machine and environment. measure=True times MLX vs numpy matmuls (~0.5 s)."""
    mlx = _mlx_info()  # imports mlx.core, so the BLAS check below sees the binding that now exists
    active = blas.active_blas()
    preload = blas.status()
    blas_info = {
        "active": active.name,
        "library": active.path,
        "detail": active.detail,
        "preload": None if preload is None else {"loaded": preload.loaded, "reason": preload.reason},
    }
    if measure and mlx.get("importable"):
        m = speed()
        blas_info["matmul"] = {"n": m.n, "mlx_gflops": m.mlx_gflops, "numpy_gflops": m.numpy_gflops}
        blas_info["slow"] = m.ratio < SLOW_RATIO
    return {
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "machine": platform.machine(),
        "cpu_count": os.cpu_count(),
        "mlx": mlx,
        "blas": blas_info,
        "env": {name: os.environ.get(name) for name in THREAD_VARS},
        "mlx_compile": blas.mlx_compile_enabled(),
        "packages": {name: package_version(name) for name in PACKAGES},
        "memory": {"total_bytes": total_memory_bytes(), "available_bytes": available_memory_bytes()},
        "disk": _disk_free(Path(artifacts_dir)),
    }


def _gib(value: int | None) -> str:
    return "unknown" if value is None else f"{value / 1024**3:.1f} GiB"


def rows(info: dict) -> list[tuple[str, str]]:
    """(label, value) pairs in display order; shared by the plain and rich renderers."""
    mlx, b = info["mlx"], info["blas"]
    if mlx.get("importable"):
        mlx_text = f"{mlx['version']} on {mlx['default_device']} (metal: {'yes' if mlx['metal_available'] else 'no'})"
    else:
        mlx_text = f"NOT importable: {mlx.get('error')}"
    blas_text = f"{b['active']} ({b['library'] or '-'}): {b['detail']}"
    extra = []
    if "matmul" in b:
        m = b["matmul"]
        verdict = "SLOW: MLX is on a reference BLAS, training ~40x slower" if b["slow"] else "ok"
        speeds = f"{m['n']}^2 f32 matmul: MLX {m['mlx_gflops']} vs numpy {m['numpy_gflops']} GFLOP/s"
        extra.append(("matmul", f"{speeds} ({verdict})"))
    out = [
        ("python", f"{info['python']} on {info['platform']}"),
        ("cpus", str(info["cpu_count"])),
        ("mlx", mlx_text),
        ("blas", blas_text),
        *extra,
    ]
    if b.get("preload"):
        out.append(("blas preload", b["preload"]["reason"]))
    out.append(("threads/env", ", ".join(f"{k}={v}" for k, v in info["env"].items() if v is not None) or "-"))
    compile_note = (
        "on (g++ JIT, cached in $TMPDIR/mlx)" if info["mlx_compile"] else "off (MLX_DISABLE_COMPILE is set)"
    )
    out.append(("mlx compile", compile_note))
    out.append(("packages", ", ".join(f"{k} {v}" for k, v in info["packages"].items() if v) or "-"))
    missing = [k for k, v in info["packages"].items() if not v]
    if missing:
        out.append(("not installed", ", ".join(missing)))
    mem, disk = info["memory"], info["disk"]
    out.append(("memory", f"{_gib(mem['available_bytes'])} available of {_gib(mem['total_bytes'])}"))
    out.append(("disk", f"{_gib(disk['free_bytes'])} free at {disk['path']}"))
    return out


def render(info: dict, *, rich: bool = False) -> str:
    """Plain aligned text by default (logs, tests); rich=True returns a boxed table as text."""
    pairs = rows(info)
    if rich:
        from rich.console import Console
        from rich.table import Table

        table = Table(title="finetune doctor", show_header=False)
        for label, value in pairs:
            table.add_row(label, value)
        with open(os.devnull, "w") as sink:  # record only; the caller decides where text goes
            console = Console(width=120, record=True, file=sink)
            console.print(table)
        return console.export_text()
    width = max(len(label) for label, _ in pairs)
    return "\n".join(f"{label:<{width}}  {value}" for label, value in pairs)
