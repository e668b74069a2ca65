"""finetune.system.doctor: facts are collected from the real process; the BLAS verdict flags a slow MLX."""

import json
import os
import platform

import pytest

from finetune.system import blas, doctor


def fast():
    return blas.MatmulSpeed(512, mlx_gflops=90.0, numpy_gflops=95.0)


def slow():
    return blas.MatmulSpeed(512, mlx_gflops=2.0, numpy_gflops=95.0)


@pytest.fixture(scope="module")
def info(tmp_path_factory):
    return doctor.collect(tmp_path_factory.mktemp("artifacts") / "not-yet" / "run", speed=fast)


def test_collect_reports_this_process(info):
    assert json.loads(json.dumps(info)) == info  # plain data, fit for run logs
    assert info["mlx"]["importable"] and info["mlx"]["version"] == doctor.package_version("mlx")
    assert info["python"] == platform.python_version() and info["cpu_count"] >= 1
    assert info["packages"]["mlx-lm"] and info["packages"]["transformers"]
    assert info["env"].keys() >= {"OPENBLAS_NUM_THREADS", "MLX_DISABLE_COMPILE"}
    assert info["mlx_compile"] == ("MLX_DISABLE_COMPILE" not in os.environ)
    mem = info["memory"]
    assert 0 < mem["available_bytes"] <= mem["total_bytes"]
    assert info["disk"]["free_bytes"] > 0  # walked up from a directory that does not exist yet
    assert info["blas"]["active"] == blas.active_blas().name  # the truth, not a copy of preload's intention


@pytest.mark.skipif(platform.system() != "Linux", reason="MLX on Linux runs on the CPU device")
def test_linux_runs_mlx_on_cpu(info):
    assert "cpu" in info["mlx"]["default_device"] and info["mlx"]["backend"] == "cpu"
    assert not info["mlx"]["metal_available"]


def test_fast_blas_is_ok(info):
    assert info["blas"]["slow"] is False
    text = doctor.render(info)
    assert "MLX 90.0 vs numpy 95.0 GFLOP/s (ok)" in text and "SLOW" not in text


def test_slow_blas_is_flagged(tmp_path):
    info = doctor.collect(tmp_path, speed=slow)
    assert info["blas"]["slow"] is True
    assert "SLOW: MLX is on a reference BLAS" in doctor.render(info)


def test_measure_false_skips_the_matmul(tmp_path):
    def boom():
        raise AssertionError("must not measure")

    info = doctor.collect(tmp_path, measure=False, speed=boom)
    assert "matmul" not in info["blas"] and "matmul" not in doctor.render(info)


def test_render_plain_and_rich(info):
    plain = doctor.render(info)
    labels = [line.split()[0] for line in plain.splitlines()]
    assert labels[:4] == ["python", "cpus", "mlx", "blas"] and "memory" in labels and "disk" in labels
    rich = doctor.render(info, rich=True)
    assert "finetune doctor" in rich and "GiB available" in rich


def test_render_names_missing_packages(info):
    broken = {**info, "packages": {**info["packages"], "gguf": None}}
    lines = doctor.render(broken).splitlines()
    assert any(line.startswith("not installed") and line.endswith(" gguf") for line in lines)


def test_render_reports_preload_env_and_compile(info):
    rows = dict(doctor.rows(info))
    assert rows["blas preload"] == blas.status().reason  # what preload did, next to what is really active
    for name, value in info["env"].items():
        if value is not None:
            assert f"{name}={value}" in rows["threads/env"]
    assert rows["mlx compile"].startswith("on" if info["mlx_compile"] else "off")


def test_render_says_when_mlx_is_not_importable(info):
    broken = {**info, "mlx": {"importable": False, "error": "libmlx.so: cannot open shared object file"}}
    assert dict(doctor.rows(broken))["mlx"] == "NOT importable: libmlx.so: cannot open shared object file"
