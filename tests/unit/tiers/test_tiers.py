"""The tiers differ only in stages and required gates; a run sweeps servers a crashed run left behind."""

from __future__ import annotations

import sys

from finetune.config.loader import load_config
from finetune.gates.registry import GATES
from finetune.system import procs
from finetune.tiers.rundir import own_config
from finetune.tiers.tiers import TIERS, run_tier
from tests.fakes import fake_deps


def test_every_required_gate_exists_and_train_is_not_judged():
    for tier in TIERS.values():
        assert set(tier.required_gates) <= set(GATES), tier.name
    assert TIERS["train"].required_gates == () and not TIERS["train"].judged
    assert [s.name for s in TIERS["run"].stages] == ["model", "data", "estimate", "train", "judge"]


def test_a_run_stops_servers_an_earlier_crashed_command_recorded(tmp_path, toy_tokenizer):
    run = tmp_path / "run"
    stale = procs.spawn_guarded([sys.executable, "-c", "import time; time.sleep(60)"], pid_dir=run / "ollama" / "pids",
                                name="ollama-serve")  # fmt: skip
    stale.watchdog.kill()  # the command that started it died without cleaning up
    cfg = own_config(run, load_config("quick"))
    lines = []
    run_tier(TIERS["train"], cfg, run, fake_deps(toy_tokenizer, tmp_path / "m"), log=lines.append)
    assert stale.wait(timeout=15) is not None
    assert any(f"stopped ollama-serve (pid {stale.pid})" in line for line in lines)


def test_a_run_removes_what_a_killed_writer_left_half_written(tmp_path, toy_tokenizer):
    run = tmp_path / "run"
    cfg = own_config(run, load_config("quick"))
    (run / "checkpoints" / ".step-0000010.x1y2.tmp").mkdir(parents=True)
    (run / "checkpoints" / ".step-0000010.x1y2.tmp" / "adapters.safetensors").write_bytes(b"half" * 8)
    lines = []
    run_tier(TIERS["train"], cfg, run, fake_deps(toy_tokenizer, tmp_path / "m"), log=lines.append)
    assert not list(run.rglob("*.tmp"))
    assert (
        "removed checkpoints/.step-0000010.x1y2.tmp (32 bytes), left half-written by an interrupted command"
        in lines
    )
