"""Load a fast BLAS for MLX on Linux, and report which BLAS MLX really uses.

The mlx-cpu wheel links a netlib reference BLAS (~2-6 GFLOP/s for a 1024^2 f32 matmul). Loading Debian's
OpenBLAS with RTLD_GLOBAL *before* the first `import mlx.core` makes libmlx bind to it instead (~100-190
GFLOP/s here). After mlx.core is imported it is too late: its symbols are already bound.

Environment:
  FT_BLAS_DISABLE=1   skip loading (a warning still says training will be slow)
  FT_BLAS_LIB=/path   load exactly this library instead of searching
Defaults set with os.environ.setdefault before loading (a value the user set wins):
  OPENBLAS_NUM_THREADS=cpus//2 (1 on 2 cores): on a busy 2-core box a SmolLM2 LoRA step took the same with 1 or
      2 threads (median ~2.3 s both), 1 is steadier and leaves a core to MLX's own ops and child servers.
  OPENBLAS_CORETYPE  only when OpenBLAS would fall back to an SSE/AVX-only kernel on a CPU with AVX2 or
      AVX-512 (Debian's 0.3.21 does not know Sapphire Rapids and picked Prescott: 16 GFLOP/s instead of 86-91
      with Cooperlake, measured); see finetune.system.openblas_core.
  MLX_DISABLE_COMPILE=1  MLX's g++ kernel JIT cost 21-33 s on the first step and made later steps no faster.
      MLX disables compilation when the variable is present with ANY value, "0" included: to compile, set
      FT_MLX_COMPILE=1 and leave MLX_DISABLE_COMPILE unset.
"""

from __future__ import annotations

import ctypes
import os
import platform
import sys
import time
from collections.abc import Callable, Iterable, Mapping, MutableMapping
from dataclasses import dataclass

from finetune.system.openblas_core import core_override, cpu_flags, detected_core

FIX_HINT = (
    "Fix: run `make setup`, or `sudo apt-get install libopenblas0-pthread libgfortran5`, "
    "or set FT_BLAS_LIB=/path/to/libopenblas.so.0."
)
_SLOW = "MLX will use the reference BLAS bundled in its wheel: training is ~40x slower."


def env_defaults(cpu_count: int | None = None, env: Mapping[str, str] | None = None) -> dict[str, str]:
    """Environment defaults preload() sets if unset (reasons in the module docstring)."""
    cpus = cpu_count or os.cpu_count() or 1
    defaults = {"OPENBLAS_NUM_THREADS": str(max(1, cpus // 2))}
    if (os.environ if env is None else env).get("FT_MLX_COMPILE") != "1":
        defaults["MLX_DISABLE_COMPILE"] = "1"
    return defaults


def mlx_compile_enabled(env: Mapping[str, str] | None = None) -> bool:
    """MLX reads MLX_DISABLE_COMPILE by presence (getenv != NULL): "0" disables too."""
    return "MLX_DISABLE_COMPILE" not in (os.environ if env is None else env)


@dataclass(frozen=True)
class BlasStatus:
    """What preload() did. `loaded` means OpenBLAS is (or will be) what MLX binds to."""

    platform: str
    library: str | None
    loaded: bool
    reason: str
    warning: str | None = None


@dataclass(frozen=True)
class ActiveBlas:
    """Which BLAS the process really uses: "openblas", "reference", "accelerate" or "unknown"."""

    name: str
    path: str | None
    mlx_loaded: bool
    detail: str


def search_paths(machine: str | None = None) -> list[str]:
    """Usual OpenBLAS locations: Debian/Ubuntu multiarch (pthread build first), then Fedora/Arch."""
    arch = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "aarch64", "arm64": "aarch64"}.get(
        (machine or platform.machine()).lower(), (machine or platform.machine()).lower()
    )
    multi = f"/usr/lib/{arch}-linux-gnu"
    return [
        f"{multi}/openblas-pthread/libopenblas.so.0",
        f"{multi}/libopenblas.so.0",
        f"{multi}/openblas-openmp/libopenblas.so.0",
        f"{multi}/openblas-serial/libopenblas.so.0",
        "/usr/lib64/libopenblas.so.0",
        "/usr/lib/libopenblas.so.0",
    ]


# ---------------------------------------------------------------- what is mapped in this process


def _is_openblas(path: str) -> bool:
    # numpy's own copy is "libscipy_openblas64_": prefixed symbols, so MLX never binds to it.
    return os.path.basename(path).startswith("libopenblas")


def _is_reference(path: str) -> bool:
    return "mlx_cpu.libs" in path and os.path.basename(path).startswith("libblas")


def _is_libmlx(path: str) -> bool:
    return os.path.basename(path) == "libmlx.so"


class _PhdrInfo(ctypes.Structure):
    _fields_ = [("dlpi_addr", ctypes.c_void_p), ("dlpi_name", ctypes.c_char_p)]


def loaded_objects() -> list[str]:
    """Shared objects in load order (dl_iterate_phdr); falls back to /proc/self/maps (address order)."""
    names: list[str] = []
    try:
        callback_type = ctypes.CFUNCTYPE(
            ctypes.c_int, ctypes.POINTER(_PhdrInfo), ctypes.c_size_t, ctypes.c_void_p
        )

        def visit(info, _size, _data):
            raw = info.contents.dlpi_name
            if raw:
                names.append(raw.decode(errors="replace"))
            return 0

        ctypes.CDLL(None).dl_iterate_phdr(callback_type(visit), None)
        if names:
            return names
    except (OSError, AttributeError):
        pass
    try:
        with open("/proc/self/maps") as fh:
            for line in fh:
                parts = line.split(None, 5)
                if len(parts) == 6 and parts[5].strip().startswith("/"):
                    path = parts[5].strip()
                    if path not in names:
                        names.append(path)
    except OSError:
        pass
    return names


def _openblas_in_global_scope() -> bool:
    try:
        return hasattr(ctypes.CDLL(None), "openblas_get_config")
    except OSError:
        return False


def active_blas(
    *,
    system: str | None = None,
    objects: Iterable[str] | None = None,
    openblas_global: bool | None = None,
) -> ActiveBlas:
    """The BLAS libmlx is bound to. libmlx takes OpenBLAS only if OpenBLAS was global before libmlx loaded."""
    system = system or platform.system()
    if system == "Darwin":
        return ActiveBlas("accelerate", None, "mlx" in sys.modules, "macOS: MLX uses Accelerate / Metal")
    if system != "Linux":
        return ActiveBlas("unknown", None, False, f"unsupported platform {system}")
    objs = list(loaded_objects() if objects is None else objects)
    in_global = _openblas_in_global_scope() if openblas_global is None else openblas_global
    ob = next((i for i, p in enumerate(objs) if _is_openblas(p)), None)
    mlx_idx = next((i for i, p in enumerate(objs) if _is_libmlx(p)), None)
    ref = next((p for p in objs if _is_reference(p)), None)
    ob_path = objs[ob] if ob is not None else None
    if mlx_idx is None:
        if ob is not None and in_global:
            return ActiveBlas("openblas", ob_path, False, "mlx not imported yet; it will bind to OpenBLAS")
        return ActiveBlas(
            "reference", None, False, "mlx not imported yet and no global OpenBLAS: it will be slow"
        )
    if ob is not None and ob < mlx_idx and in_global:
        return ActiveBlas("openblas", ob_path, True, "OpenBLAS was loaded before libmlx")
    if ob is not None:
        return ActiveBlas("reference", ref, True, f"OpenBLAS ({ob_path}) was loaded after libmlx: not used")
    return ActiveBlas("reference", ref, True, "no OpenBLAS mapped: MLX uses its reference BLAS")


# ---------------------------------------------------------------- preload

_STATUS: BlasStatus | None = None
_WARNED: set[str] = set()


def _warn_once(message: str) -> None:
    if message not in _WARNED:
        _WARNED.add(message)
        bar = "=" * 78
        print(f"{bar}\nFineTune WARNING: {message}\n{bar}", file=sys.stderr, flush=True)


def _ctypes_load(path: str) -> None:
    ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)


def preload(
    *,
    env: MutableMapping[str, str] | None = None,
    paths: Iterable[str] | None = None,
    system: str | None = None,
    modules: Mapping[str, object] | None = None,
    loader: Callable[[str], None] | None = None,
    active: Callable[[], ActiveBlas] | None = None,
    warn: Callable[[str], None] | None = None,
) -> BlasStatus:
    """Load OpenBLAS globally before mlx.core. Cheap and never raises; a no-op off Linux.

    Every argument is injectable for tests; with none given the result is also what status() returns.
    """
    global _STATUS
    real = all(x is None for x in (env, paths, system, modules, loader, active, warn))
    if real and _STATUS is not None:  # the process-level load happens once; later calls just report it
        return _STATUS
    try:
        result = _preload(
            os.environ if env is None else env,
            paths,
            system or platform.system(),
            sys.modules if modules is None else modules,
            loader or _ctypes_load,
            active or active_blas,
            warn or _warn_once,
        )
    except Exception as exc:  # must never break `import finetune`
        result = BlasStatus(sys.platform, None, False, f"preload failed: {exc!r}", f"preload failed: {exc!r}")
        (warn or _warn_once)(result.warning)
    if real:
        _STATUS = result
    return result


def _preload(env, paths, system, modules, loader, active, warn) -> BlasStatus:
    plat = f"{system.lower()}-{platform.machine()}"
    if system != "Linux":
        return BlasStatus(plat, None, False, "not Linux: MLX uses Accelerate/Metal, nothing to load")
    for key, value in env_defaults(env=env).items():
        env.setdefault(key, value)

    def fail(reason: str, library: str | None = None) -> BlasStatus:
        message = f"{reason}\n{_SLOW}\n{FIX_HINT}"
        warn(message)
        return BlasStatus(plat, library, False, reason, message)

    now = active()
    if now.name == "openblas":  # e.g. LD_PRELOAD: report the truth even if FT_BLAS_DISABLE is set
        return BlasStatus(plat, now.path, True, f"already active ({now.detail})")
    if env.get("FT_BLAS_DISABLE") == "1":
        return fail("FT_BLAS_DISABLE=1: not loading OpenBLAS.")
    if "mlx.core" in modules:
        return fail(
            "mlx.core was imported before finetune.system.blas.preload(): too late to swap its BLAS. "
            "Import finetune before mlx, or start Python with "
            f"LD_PRELOAD={search_paths()[0]}."
        )
    override = env.get("FT_BLAS_LIB")
    candidates = [override] if override else list(search_paths() if paths is None else paths)
    found = next((p for p in candidates if os.path.exists(p)), None)
    if found is None:
        where = f"FT_BLAS_LIB={override} does not exist" if override else "OpenBLAS not found"
        return fail(f"{where} (searched: {', '.join(candidates)}).")
    note = ""
    if "OPENBLAS_CORETYPE" not in env and loader is _ctypes_load and (flags := cpu_flags()):
        detected = detected_core(found)
        if core := core_override(detected, flags):
            env["OPENBLAS_CORETYPE"] = core
            note = f"; OPENBLAS_CORETYPE={core} (OpenBLAS picked the generic {detected} kernel for this CPU)"
    try:
        loader(found)
    except OSError as exc:
        return fail(f"could not load {found}: {exc}", found)
    return BlasStatus(plat, found, True, f"loaded {found} before mlx.core{note}")


def status() -> BlasStatus | None:
    """What the process-level preload() did (None if it never ran)."""
    return _STATUS


# ---------------------------------------------------------------- measurement


def seconds_per_call(run: Callable[[], object], budget_s: float, max_reps: int = 50) -> float:
    """Mean seconds of `run`, repeated for `budget_s` (at most max_reps times) after one warm-up call."""
    run()  # warm-up: allocations and first-use setup
    reps, start = 0, time.perf_counter()
    while True:
        run()
        reps += 1
        elapsed = time.perf_counter() - start
        if elapsed >= budget_s or reps >= max_reps:
            return elapsed / reps


def gflops(run: Callable[[], object], n: int, budget_s: float, max_reps: int = 50) -> float:
    """GFLOP/s of `run` (an n x n matmul), repeated for `budget_s` after one warm-up call."""
    return 2 * n**3 / seconds_per_call(run, budget_s, max_reps) / 1e9


@dataclass(frozen=True)
class MatmulSpeed:
    """f32 n x n matmul throughput of MLX and of numpy (its own OpenBLAS) measured side by side."""

    n: int
    mlx_gflops: float
    numpy_gflops: float

    @property
    def ratio(self) -> float:
        # A ratio survives a busy machine: both slow down together. OpenBLAS ~0.5-1.4, reference ~0.03-0.1.
        return self.mlx_gflops / self.numpy_gflops if self.numpy_gflops else 0.0


def measure_matmul(n: int = 512, *, budget_s: float = 0.2) -> MatmulSpeed:
    """Measure MLX vs numpy matmul in this process (imports mlx.core and numpy)."""
    import mlx.core as mx
    import numpy as np

    a, b = mx.random.normal((n, n)), mx.random.normal((n, n))
    an = np.random.default_rng(0).standard_normal((n, n), dtype=np.float32)
    mlx_speed = gflops(lambda: mx.eval(a @ b), n, budget_s)
    return MatmulSpeed(n, round(mlx_speed, 1), round(gflops(lambda: an @ an, n, budget_s), 1))
