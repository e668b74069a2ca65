"""A normal `pip install .` (a wheel) has everything outside the repo: the profiles and the Ollama stub."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

from finetune.config.loader import list_profiles

ROOT = Path(__file__).resolve().parents[1]


def test_the_wheel_ships_the_profiles_and_its_cli_lists_them_outside_the_repo(tmp_path):
    # from a copy: setuptools leaves build/ in the tree it builds, and a stale build/lib ships deleted modules
    src, dist = tmp_path / "src", tmp_path / "dist"
    shutil.copytree(ROOT, src, ignore=shutil.ignore_patterns(".*", "build", "artifacts", "tests", "docs", "bench",
                                                             "*.egg-info", "__pycache__"))  # fmt: skip
    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(dist),
                    str(src)], check=True, capture_output=True, timeout=600)  # fmt: skip
    (wheel,) = dist.glob("finetune-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    modules = {p.relative_to(ROOT).as_posix() for p in (ROOT / "finetune").rglob("*.py")}
    assert {n for n in names if n.endswith(".py")} == modules  # every module, and nothing deleted since
    assert {f"finetune/config/profiles/{p}.yaml" for p in [*list_profiles(), "base"]} <= set(names)
    assert "finetune/serve/ollama_sycl_stub.c" in names and "finetune/system/watchdog.py" in names

    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    pip = [str(env_dir / "bin" / "python"), "-m", "pip", "install", "-q", "--disable-pip-version-check"]
    # the CLI's config commands need only these two of the wheel's dependencies
    subprocess.run([*pip, "--no-deps", str(wheel)], check=True, capture_output=True, timeout=600)
    subprocess.run([*pip, "pyyaml>=6,<7", "pydantic>=2.10,<3"], check=True, capture_output=True, timeout=600)
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    proc = subprocess.run([str(env_dir / "bin" / "finetune"), "config", "profiles"], cwd=outside, capture_output=True,
                          text=True, timeout=120, env={"PATH": "/usr/bin:/bin", "HOME": str(tmp_path)})  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == list_profiles()
