"""Around a recipe: the run directory tidied before, a signal between stages, the verdict after."""

from __future__ import annotations

import signal
import sys

from finetune.config.loader import load_config
from finetune.recipes.commands import RECIPES
from finetune.recipes.execution import Command, open_run
from finetune.report.models import StageReport
from finetune.stages.context import Stage
from finetune.stages.rundir import own_config
from finetune.system import procs
from finetune.system.signals import Interrupted
from tests.fakes import fake_deps


def test_a_run_stops_servers_an_earlier_crashed_command_recorded(tmp_path, toy_tokenizer):
    run = tmp_path / "run"
    cfg = own_config(run, load_config("quick"))
    stale = procs.spawn_guarded([sys.executable, "-c", "import time; time.sleep(60)"], pid_dir=run / "ollama" / "pids",
                                name="ollama-serve")  # fmt: skip
    stale.watchdog.kill()  # the command that started it died without cleaning up
    lines = []
    RECIPES["train"](cfg, run, fake_deps(toy_tokenizer, tmp_path / "m"), log=lines.append)
    assert stale.wait(timeout=15) is not None
    assert any(f"stopped ollama-serve (pid {stale.pid})" in line for line in lines)


def test_a_run_removes_what_a_killed_writer_left_half_written(tmp_path, toy_tokenizer):
    run = tmp_path / "run"
    cfg = own_config(run, load_config("quick"))
    (run / "checkpoints" / ".step-0000010.x1y2.tmp").mkdir(parents=True)
    (run / "checkpoints" / ".step-0000010.x1y2.tmp" / "adapters.safetensors").write_bytes(b"half" * 8)
    lines = []
    RECIPES["train"](cfg, run, fake_deps(toy_tokenizer, tmp_path / "m"), log=lines.append)
    assert not list(run.rglob("*.tmp"))
    assert (
        "removed checkpoints/.step-0000010.x1y2.tmp (32 bytes), left half-written by an interrupted command"
        in lines
    )


def test_a_signal_between_two_stages_ends_the_run_interrupted_with_its_resume_command(
    tmp_path, toy_tokenizer
):
    run = tmp_path / "run"
    cfg = own_config(run, load_config("quick"))
    stage = Stage("a", lambda c: StageReport(), lambda c: {})
    with open_run(Command("run", gates=("g",)), cfg, run, fake_deps(toy_tokenizer, tmp_path / "m"),
                  log=lambda _: None) as r:  # fmt: skip
        r.stage(stage)
        raise Interrupted(signal.SIGTERM)
    report = r.finished.report
    assert report.status == "interrupted" and r.finished.exit_code == 143
    assert report.resume_command and "--resume" in report.resume_command
    assert [(s.name, s.status) for s in report.stages] == [("a", "passed")]
    assert [(g.name, g.status) for g in report.gates] == [("g", "skipped")]
