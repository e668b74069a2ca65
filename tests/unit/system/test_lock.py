"""Run-directory locks refuse a second command at once; cache locks wait; both vanish with their holder."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from finetune.system.lock import LockTimeout, RunDirBusy, run_dir_lock, waiting_lock

ROOT = Path(__file__).resolve().parents[3]


def _hold(path: Path, kind: str) -> subprocess.Popen:
    code = (f"import sys, time; sys.path.insert(0, {str(ROOT)!r}); from pathlib import Path; "
            f"from finetune.system.lock import {kind}; "
            f"cm = {kind}(Path({str(path)!r}), 'finetune run') if {kind == 'run_dir_lock'} else "
            f"{kind}(Path({str(path)!r})); cm.__enter__(); print('held', flush=True); time.sleep(60)")  # fmt: skip
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    return proc


def test_a_second_command_on_a_busy_run_dir_is_refused_naming_the_holder(tmp_path):
    holder = _hold(tmp_path, "run_dir_lock")
    try:
        with (
            pytest.raises(RunDirBusy, match=rf"in use by `finetune run` \(pid {holder.pid}\)"),
            run_dir_lock(tmp_path, "x"),
        ):
            pass
    finally:
        holder.kill()
        holder.wait()
    with run_dir_lock(tmp_path, "finetune run"):  # the kernel dropped the dead holder's lock
        pass


def test_a_waiting_lock_times_out_and_is_free_after_its_holder_dies(tmp_path):
    holder = _hold(tmp_path / "cache.lock", "waiting_lock")
    try:
        tic = time.monotonic()
        with pytest.raises(LockTimeout), waiting_lock(tmp_path / "cache.lock", timeout_s=0.5):
            pass
        assert time.monotonic() - tic < 5
    finally:
        holder.kill()
        holder.wait()
    with waiting_lock(tmp_path / "cache.lock", timeout_s=5):
        pass
