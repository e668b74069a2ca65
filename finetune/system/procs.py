"""Child processes that cannot outlive FineTune, and the pid files that let a later run sweep up after a crash.

A server child (Ollama, llama.cpp) runs in its own session (so stopping its process group also stops the
runners it spawns), gets PR_SET_PDEATHSIG on Linux, and is watched by a tiny watchdog process that kills
the whole group when FineTune dies, even by SIGKILL. Its pid file under RUN/pids/ lets the next command on
that run directory stop what a crash left behind, and only that (pid + start time must both match).
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import psutil

from finetune.system.atomic import atomic_write_json

PID_DIR = "pids"
WATCHDOG = Path(__file__).with_name("watchdog.py")
_PR_SET_PDEATHSIG = 1


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _die_with_parent() -> None:
    # Runs in the child between fork and exec. Linux only; the watchdog covers the rest (and macOS).
    with contextlib.suppress(Exception):
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def spawn_guarded(
    cmd: Sequence[str], *, pid_dir: Path | None = None, name: str = "child", **popen: Any
) -> subprocess.Popen:
    """Popen in a new session with PDEATHSIG, a watchdog, and (with pid_dir) a pid file for later sweeps."""
    preexec = _die_with_parent if sys.platform.startswith("linux") else None
    proc = subprocess.Popen(list(cmd), start_new_session=True, preexec_fn=preexec, **popen)  # noqa: PLW1509
    watchdog = subprocess.Popen(
        [sys.executable, "-I", str(WATCHDOG), str(os.getpid()), str(proc.pid)],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    proc.watchdog = watchdog  # type: ignore[attr-defined]
    if pid_dir is not None:
        record = {
            "name": name,
            "pid": proc.pid,
            "pgid": proc.pid,
            "started": start_time(proc.pid),
            "cmd": list(map(str, cmd)),
            "parent": os.getpid(),
            "watchdog": watchdog.pid,
        }
        atomic_write_json(Path(pid_dir) / f"{name}-{proc.pid}.json", record)
        proc.pid_file = Path(pid_dir) / f"{name}-{proc.pid}.json"  # type: ignore[attr-defined]
    return proc


def run_guarded(
    cmd: Sequence[str], *, timeout: float, pid_dir: Path | None = None, name: str = "child", **popen: Any
) -> subprocess.CompletedProcess:
    """subprocess.run(capture_output=True, text=True), but the child cannot outlive us, even on SIGKILL."""
    popen = {k: v for k, v in popen.items() if k not in ("capture_output", "text")}
    captured = {
        "stdout": subprocess.PIPE,
        "stderr": subprocess.PIPE,
        "text": True,
        "stdin": subprocess.DEVNULL,
    }
    proc = spawn_guarded(cmd, pid_dir=pid_dir, name=name, **captured, **popen)
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        stop_group(proc, grace=2)
        out, err = proc.communicate()
        raise subprocess.TimeoutExpired(list(cmd), timeout, output=out, stderr=err) from None
    except BaseException:
        stop_group(proc, grace=2)
        raise
    stop_group(proc, grace=2)  # reaps the watchdog and drops the pid file; the child itself has exited
    return subprocess.CompletedProcess(list(cmd), proc.returncode, out, err)


def stop_group(proc: subprocess.Popen, *, grace: float = 10.0) -> None:
    """SIGTERM the child's process group (and any descendant that left it), SIGKILL after `grace` seconds."""
    family = descendants(proc.pid)
    signal_family(proc.pid, family, signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=grace)
    signal_family(proc.pid, family, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        proc.wait(timeout=30)
    watchdog = getattr(proc, "watchdog", None)
    if watchdog is not None:
        with contextlib.suppress(ProcessLookupError):
            watchdog.kill()
        watchdog.wait()
    pid_file = getattr(proc, "pid_file", None)
    if pid_file is not None:
        Path(pid_file).unlink(missing_ok=True)


def descendants(pid: int) -> dict[int, float]:
    """Processes below pid with their start times, so a recycled pid is never signalled later."""
    try:
        return {c.pid: c.create_time() for c in psutil.Process(pid).children(recursive=True)}
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return {}


def signal_family(leader: int, family: dict[int, float], sig: signal.Signals) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(leader, sig)  # start_new_session made the group id equal to the leader's pid
    for pid, started in family.items():
        if start_time(pid) == started:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)


def recorded(pid_dir: Path) -> list[dict]:
    out = []
    for path in sorted(Path(pid_dir).glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            out.append({**json.loads(path.read_text()), "file": str(path)})
    return out


def alive(record: dict) -> bool:
    """The recorded process still runs: same pid AND same start time (pids are recycled)."""
    started = start_time(int(record["pid"]))
    return (
        started is not None and record.get("started") is not None and abs(started - record["started"]) < 0.01
    )


def sweep(pid_dir: Path, *, grace: float = 5.0) -> list[dict]:
    """Stop servers a crashed earlier command left running (only those it recorded); return what was stopped."""
    stopped = []
    for record in recorded(pid_dir):
        if alive(record):
            pgid = int(record.get("pgid", record["pid"]))
            family = descendants(int(record["pid"]))
            for sig in (signal.SIGTERM, signal.SIGKILL):
                signal_family(pgid, family, sig)
                deadline = time.monotonic() + grace
                while alive(record) and time.monotonic() < deadline:
                    time.sleep(0.1)
                if not alive(record):
                    break
            stopped.append(record)
        Path(record["file"]).unlink(missing_ok=True)
    return stopped


def orphans(records: Iterable[dict]) -> list[dict]:
    """Which recorded processes (and their recorded descendants) are still alive."""
    return [r for r in records if alive(r)]
