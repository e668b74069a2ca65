"""finetune.system.blas: OpenBLAS preload decisions (injected, no patching) and the real speed-up in a child process."""

import json
import os
import platform
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.system import blas, openblas_core

ROOT = Path(__file__).resolve().parents[3]
REFERENCE = blas.ActiveBlas("reference", None, False, "nothing loaded")
OPENBLAS = blas.ActiveBlas("openblas", "/x/libopenblas.so.0", True, "loaded before libmlx")
# MLX/numpy matmul ratio: measured 0.9-1.9 with OpenBLAS, 0.03-0.1 with the wheel's reference BLAS.
MIN_RATIO = 0.25


def run_preload(
    tmp_path, *, env=None, paths=None, modules=None, active=REFERENCE, system="Linux", loader=None
):
    loaded, warnings = [], []
    status = blas.preload(
        env={} if env is None else env,
        paths=[str(tmp_path / "missing.so")] if paths is None else paths,
        system=system,
        modules={} if modules is None else modules,
        loader=loader or loaded.append,
        active=lambda: active,
        warn=warnings.append,
    )
    return status, loaded, warnings


def fake_lib(tmp_path, name="libopenblas.so.0"):
    lib = tmp_path / name
    lib.write_bytes(b"")
    return str(lib)


def test_missing_library_is_loud(tmp_path):
    status, loaded, warnings = run_preload(tmp_path)
    assert not status.loaded and status.library is None and loaded == []
    assert len(warnings) == 1 and status.warning == warnings[0]
    text = warnings[0]
    assert "40x slower" in text and "apt-get install libopenblas0-pthread" in text and "make setup" in text
    assert str(tmp_path / "missing.so") in text  # says where it looked


def test_loads_first_existing_library_and_sets_defaults(tmp_path):
    first, second = fake_lib(tmp_path), fake_lib(tmp_path, "other.so")
    env = {}
    status, loaded, warnings = run_preload(tmp_path, env=env, paths=[str(tmp_path / "no.so"), first, second])
    assert status.loaded and status.library == first and loaded == [first] and warnings == []
    assert env == blas.env_defaults(env={})


def test_compile_opt_in_leaves_mlx_disable_compile_unset(tmp_path):
    env = {"FT_MLX_COMPILE": "1"}
    run_preload(tmp_path, env=env, paths=[fake_lib(tmp_path)])
    assert "MLX_DISABLE_COMPILE" not in env and blas.mlx_compile_enabled(env)
    assert not blas.mlx_compile_enabled({"MLX_DISABLE_COMPILE": "0"})  # presence disables, whatever the value


def test_env_defaults_leave_cores_free():
    assert blas.env_defaults(2, env={}) == {"OPENBLAS_NUM_THREADS": "1", "MLX_DISABLE_COMPILE": "1"}
    assert blas.env_defaults(1)["OPENBLAS_NUM_THREADS"] == "1"
    assert blas.env_defaults(8)["OPENBLAS_NUM_THREADS"] == "4"


def test_user_settings_win_over_defaults(tmp_path):
    env = {"OPENBLAS_NUM_THREADS": "2", "MLX_DISABLE_COMPILE": "yes"}
    run_preload(tmp_path, env=env, paths=[fake_lib(tmp_path)])
    assert env == {"OPENBLAS_NUM_THREADS": "2", "MLX_DISABLE_COMPILE": "yes"}


def test_override_is_used_and_never_silently_replaced(tmp_path):
    override = fake_lib(tmp_path, "custom.so")
    status, loaded, _ = run_preload(tmp_path, env={"FT_BLAS_LIB": override}, paths=[fake_lib(tmp_path)])
    assert status.loaded and loaded == [override]

    missing = str(tmp_path / "gone.so")
    status, loaded, warnings = run_preload(tmp_path, env={"FT_BLAS_LIB": missing}, paths=[fake_lib(tmp_path)])
    assert not status.loaded and loaded == [] and f"FT_BLAS_LIB={missing} does not exist" in warnings[0]


def test_disable_env_skips_loading_but_still_warns(tmp_path):
    status, loaded, warnings = run_preload(tmp_path, env={"FT_BLAS_DISABLE": "1"}, paths=[fake_lib(tmp_path)])
    assert not status.loaded and loaded == [] and "FT_BLAS_DISABLE=1" in warnings[0]


def test_too_late_after_mlx_import(tmp_path):
    status, loaded, warnings = run_preload(
        tmp_path, modules={"mlx.core": object()}, paths=[fake_lib(tmp_path)]
    )
    assert not status.loaded and loaded == [] and "too late" in warnings[0] and "LD_PRELOAD" in warnings[0]


def test_already_active_is_not_reloaded(tmp_path):
    status, loaded, warnings = run_preload(tmp_path, modules={"mlx.core": object()}, active=OPENBLAS)
    assert status.loaded and status.library == OPENBLAS.path and loaded == [] and warnings == []


def test_load_error_is_reported_and_never_raises(tmp_path):
    def broken(path):
        raise OSError("libgfortran.so.5: cannot open shared object file")

    status, _, warnings = run_preload(tmp_path, paths=[fake_lib(tmp_path)], loader=broken)
    assert not status.loaded and "libgfortran" in warnings[0]

    def crash(path):
        raise RuntimeError("unexpected")

    status, _, warnings = run_preload(tmp_path, paths=[fake_lib(tmp_path)], loader=crash)
    assert not status.loaded and "preload failed" in status.reason and warnings


def test_macos_is_a_quiet_noop(tmp_path):
    env = {}
    status, loaded, warnings = run_preload(tmp_path, env=env, system="Darwin", paths=[fake_lib(tmp_path)])
    assert not status.loaded and loaded == [] and warnings == [] and env == {}


def test_default_warning_goes_to_stderr_once(tmp_path, capsys):
    missing = str(tmp_path / f"unique-{os.getpid()}.so")  # a message no earlier test printed
    for _ in range(2):  # warn= not given: the process-wide once-only stderr warning
        status = blas.preload(
            env={"FT_BLAS_LIB": missing},
            paths=[],
            system="Linux",
            modules={},
            loader=lambda _p: None,
            active=lambda: REFERENCE,
        )
        assert not status.loaded and missing in status.warning
    err = capsys.readouterr().err
    assert err.count(f"FT_BLAS_LIB={missing} does not exist") == 1 and "FineTune WARNING" in err


def test_search_paths_cover_multiarch():
    assert "/usr/lib/aarch64-linux-gnu/openblas-pthread/libopenblas.so.0" in blas.search_paths("aarch64")
    assert blas.search_paths("x86_64")[0] == "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0"


@pytest.mark.parametrize(
    ("objects", "in_global", "expected"),
    [
        (["/a/libopenblas.so.0", "/b/mlx/lib/libmlx.so", "/c/mlx_cpu.libs/libblas-1.so.3"], True, "openblas"),
        (
            ["/b/mlx/lib/libmlx.so", "/c/mlx_cpu.libs/libblas-1.so.3", "/a/libopenblas.so.0"],
            True,
            "reference",
        ),
        (["/a/libopenblas.so.0", "/b/mlx/lib/libmlx.so"], False, "reference"),  # loaded RTLD_LOCAL
        (["/b/mlx/lib/libmlx.so", "/np/libscipy_openblas64_-x.so"], False, "reference"),  # numpy's copy
        (["/a/libopenblas.so.0"], True, "openblas"),  # mlx not imported yet
    ],
)
def test_active_blas_follows_load_order(objects, in_global, expected):
    found = blas.active_blas(system="Linux", objects=objects, openblas_global=in_global)
    assert found.name == expected
    assert found.mlx_loaded == any(p.endswith("libmlx.so") for p in objects)


def test_process_preload_ran_once_at_import():
    first = blas.status()
    assert first is not None  # `import finetune` ran it
    assert blas.preload() is first  # later real calls report the same result, they do not reload


def test_gflops_counts_warmup_apart_and_stops_at_max_reps():
    calls = []
    speed = blas.gflops(lambda: calls.append(1), n=10, budget_s=60.0, max_reps=3)
    assert len(calls) == 4 and speed > 0  # 1 warm-up + 3 timed
    assert blas.MatmulSpeed(8, mlx_gflops=5.0, numpy_gflops=0.0).ratio == 0.0
    assert blas.MatmulSpeed(8, mlx_gflops=5.0, numpy_gflops=10.0).ratio == 0.5


def _child_speed(env_extra: dict) -> dict:
    code = (
        "import json, finetune\n"  # the package import runs preload() before mlx.core
        "from finetune.system import blas\n"
        # three interleaved measurements: a busy machine slows one side at a time; the ratio's spread shows it
        "r = [blas.measure_matmul(512, budget_s=0.3) for _ in range(3)]\n"
        "print(json.dumps({'ratio': max(s.ratio for s in r), 'lowest': min(s.ratio for s in r), "
        "'mlx': max(s.mlx_gflops for s in r), 'active': blas.active_blas().name}))\n"
    )
    env = {**os.environ, **env_extra, "PYTHONPATH": str(ROOT)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout.strip().splitlines()[-1])


needs_openblas = pytest.mark.skipif(
    platform.system() != "Linux" or not any(os.path.exists(p) for p in blas.search_paths()),
    reason="Linux with OpenBLAS only (macOS uses Accelerate; elsewhere run `make setup`)",
)


@needs_openblas
def test_preloaded_openblas_makes_mlx_matmul_fast_and_doctor_tells_the_reference_apart():
    # MLX against MLX, both single-threaded, measured alternately: a busy machine slows both alike, unlike
    # a comparison with numpy (measured 15x on a quiet machine; the reference BLAS ~1.5-6 GFLOP/s).
    fast, slow = [], []
    for _ in range(2):
        fast.append(_child_speed({"FT_BLAS_DISABLE": "0"}))
        slow.append(_child_speed({"FT_BLAS_DISABLE": "1"}))
    assert {g["active"] for g in fast} == {"openblas"} and {g["active"] for g in slow} == {"reference"}
    assert max(g["mlx"] for g in fast) >= 4 * max(g["mlx"] for g in slow), (fast, slow)
    assert max(g["lowest"] for g in slow) < MIN_RATIO, slow  # what `finetune doctor` calls SLOW


# ---------------------------------------------------------------- OpenBLAS kernel choice

DEBIAN_OPENBLAS = platform.system() == "Linux" and os.path.exists(blas.search_paths()[0])


@pytest.mark.skipif(not DEBIAN_OPENBLAS, reason="needs Linux with Debian's OpenBLAS")
def test_import_finetune_never_leaves_openblas_on_a_generic_kernel_when_the_cpu_has_avx2():
    code = (
        "import ctypes, os, finetune; from finetune.system import blas; s = blas.status(); "
        "lib = ctypes.CDLL(s.library); lib.openblas_get_corename.restype = ctypes.c_char_p; "
        "print(lib.openblas_get_corename().decode()); print(s.reason)"
    )
    # what a user's `import finetune` does: no kernel, BLAS library or opt-out chosen in the environment
    chosen = ("OPENBLAS_CORETYPE", "FT_BLAS_DISABLE", "FT_BLAS_LIB")
    env = {k: v for k, v in os.environ.items() if k not in chosen}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    core, reason = done.stdout.split("\n")[:2]
    detected = openblas_core.detected_core(blas.search_paths()[0])
    if openblas_core.wanted_core(openblas_core.cpu_flags()) is None:
        pytest.skip("this CPU has no AVX2: OpenBLAS's generic kernels are right for it")
    assert core.lower() not in openblas_core.GENERIC_CORES, (core, reason)
    if detected and detected.lower() in openblas_core.GENERIC_CORES:
        assert f"OPENBLAS_CORETYPE={core}" in reason
