"""Guarded children: they die with their parent even on SIGKILL, and a later sweep stops what a crash left."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import psutil

from finetune.system import procs

SLEEPER = [sys.executable, "-c", "import subprocess, sys, time; "
           "subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); time.sleep(120)"]  # fmt: skip


def _wait_gone(pids, timeout=15.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        left = [
            p for p in pids if psutil.pid_exists(p) and psutil.Process(p).status() != psutil.STATUS_ZOMBIE
        ]
        if not left:
            return []
        time.sleep(0.1)
    return left


def _family(pid: int, n: int, timeout: float = 10.0) -> list[int]:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        kids = psutil.Process(pid).children(recursive=True)
        if len(kids) >= n:
            return [pid, *(k.pid for k in kids)]
        time.sleep(0.05)
    raise AssertionError(f"{pid} did not start {n} children")


def test_free_port_is_bindable_on_loopback():
    import socket

    port = procs.free_port()
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))


def test_stop_group_stops_the_child_and_its_grandchildren_and_removes_the_pid_file(tmp_path):
    proc = procs.spawn_guarded(SLEEPER, pid_dir=tmp_path, name="sleeper")
    family = _family(proc.pid, 1)
    (record,) = procs.recorded(tmp_path)
    assert record["pid"] == proc.pid and procs.alive(record)
    procs.stop_group(proc, grace=2)
    assert _wait_gone(family) == [] and procs.recorded(tmp_path) == []


def test_run_guarded_returns_the_output_and_leaves_no_pid_file(tmp_path):
    cmd = [sys.executable, "-c", "import sys; print('out'); print('err', file=sys.stderr); sys.exit(3)"]
    done = procs.run_guarded(cmd, timeout=30, pid_dir=tmp_path, name="echo", capture_output=True, text=True)
    assert (done.returncode, done.stdout, done.stderr) == (3, "out\n", "err\n")
    assert procs.recorded(tmp_path) == []


def test_run_guarded_timeout_stops_the_child_and_its_grandchildren(tmp_path):
    pids = tmp_path / "pids"
    cmd = [sys.executable, "-c", "import os, subprocess, sys, time; "
           "g = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(120)']); "
           f"open({str(pids)!r}, 'w').write(f'{{os.getpid()}} {{g.pid}}'); time.sleep(120)"]  # fmt: skip
    t0 = time.monotonic()
    try:
        procs.run_guarded(cmd, timeout=3, pid_dir=tmp_path, name="sleeper")
    except subprocess.TimeoutExpired as exc:
        assert exc.timeout == 3
    else:
        raise AssertionError("the sleeper finished before its timeout")
    assert time.monotonic() - t0 < 10
    family = [int(p) for p in pids.read_text().split()]
    assert len(family) == 2 and _wait_gone(family) == [] and procs.recorded(tmp_path) == []


def test_children_die_when_their_parent_is_killed_with_sigkill(tmp_path):
    """A parent (standing in for finetune) starts a guarded server and is SIGKILLed: nothing survives it."""
    script = tmp_path / "parent.py"
    script.write_text(
        "import sys, time\n"
        f"sys.path.insert(0, {str(Path(__file__).resolve().parents[3])!r})\n"
        "from finetune.system import procs\n"
        f"p = procs.spawn_guarded({SLEEPER!r}, pid_dir={str(tmp_path / 'pids')!r}, name='srv')\n"
        "print(p.pid, flush=True)\n"
        "time.sleep(120)\n"
    )
    parent = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE, text=True)
    child = int(parent.stdout.readline())
    family = _family(child, 1)
    os.kill(parent.pid, signal.SIGKILL)  # no handler can run: the watchdog and PDEATHSIG must do it
    parent.wait()
    assert _wait_gone(family) == [], "a guarded child outlived its SIGKILLed parent"


def test_sweep_stops_only_recorded_live_processes(tmp_path):
    survivor = subprocess.Popen(SLEEPER, start_new_session=True)  # started by someone else: never touched
    try:
        proc = procs.spawn_guarded(SLEEPER, pid_dir=tmp_path, name="left")
        family = _family(proc.pid, 1)
        proc.watchdog.kill()  # as if this process had crashed without cleaning up
        (tmp_path / "gone-1.json").write_text('{"name": "gone", "pid": 999999, "started": 1.0}')
        stopped = procs.sweep(tmp_path, grace=2)
        assert [r["name"] for r in stopped] == ["left"]
        assert _wait_gone(family) == [] and procs.recorded(tmp_path) == []
        assert survivor.poll() is None
    finally:
        survivor.kill()
        survivor.wait()


def test_a_recycled_pid_is_not_alive_for_its_old_record():
    me = {"pid": os.getpid(), "started": procs.start_time(os.getpid()) - 100.0}
    assert not procs.alive(me) and procs.alive({"pid": os.getpid(), "started": procs.start_time(os.getpid())})
