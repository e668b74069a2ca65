"""finetune.train.follower, through the real `mlx.launch` (ring backend, 2 local ranks) running `finetune train`
unchanged: rank 0 runs the command, rank 1 follows what rank 0 sends and writes nothing; the training equals the
one FineTune's own local ranks (training.ranks=2) do, bit for bit (the same shards, the same ring)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.system.hashing import dir_manifest

BIN = Path(sys.executable).parent
SETS = ["model.name=tiny-llama", "training.iters=12", "training.eval_every=6", "training.save_every=6",
        "training.batch_size=4", "gates.skip=[memory_efficiency]"]  # fmt: skip


def _train(
    run_dir: Path, *extra: str, launcher: list[str] = (), resume: bool = False
) -> subprocess.CompletedProcess:
    sets = [] if resume else [a for s in [*SETS, *extra] for a in ("--set", s)]
    args = ["-m", "finetune.cli", "train", "--run-dir", str(run_dir), *(["--resume"] if resume else ["-p", "quick"]),
            *sets, "--quiet"]  # fmt: skip
    cmd = [*launcher, *args] if launcher else [sys.executable, *args]
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLX_")}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=600, env=env, cwd=Path.cwd())


def _launcher() -> list[str]:
    return [str(BIN / "mlx.launch"), "-n", "2", "--backend", "ring", "--python", sys.executable, "--"]


def _files(run_dir: Path) -> list[str]:
    return sorted(p.relative_to(run_dir).as_posix() for p in run_dir.rglob("*") if p.is_file())


def _losses(run_dir: Path) -> list[float]:
    return [json.loads(ln).get("train_loss") for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.fixture(scope="module")
def local_two(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("local") / "run"
    done = _train(run_dir, "training.ranks=2")
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    return run_dir


@pytest.fixture(scope="module")
def launched(tmp_path_factory) -> tuple[Path, subprocess.CompletedProcess]:
    run_dir = tmp_path_factory.mktemp("launched") / "run"
    return run_dir, _train(run_dir, launcher=_launcher())


def test_finetune_train_under_mlx_launch_equals_finetunes_own_two_ranks(local_two, launched):
    run_dir, done = launched
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert _losses(run_dir) == _losses(local_two)
    assert dir_manifest(run_dir / "adapter") == dir_manifest(local_two / "adapter")
    # one writer: the same files as the local run (whose rank 1 writes nothing either), no second report
    ignored = {"config.yaml", "report.json", "report.html", "train_result.json"}
    same = [f for f in _files(run_dir) if f not in ignored and not f.startswith(("stages/", "pids/"))]
    assert same == [
        f for f in _files(local_two) if f not in ignored and not f.startswith(("stages/", "pids/"))
    ]
    assert done.stdout.count("report: ") == 1  # rank 1 printed no result of its own


def test_a_finished_run_under_mlx_launch_tells_the_other_rank_there_is_nothing_to_train(launched):
    run_dir, done = launched
    assert done.returncode == 0
    again = _train(run_dir, launcher=_launcher(), resume=True)  # every stage cached: rank 0 never trains
    assert again.returncode == 0, again.stdout[-2000:] + again.stderr[-2000:]
    assert "cached" in again.stdout
