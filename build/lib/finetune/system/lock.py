"""File locks: a waiting lock for shared caches, a refusing lock for run directories.

flock is dropped by the kernel when its holder dies, so a crash or SIGKILL never leaves a stale lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import time
from collections.abc import Iterator
from pathlib import Path

from finetune.errors import UserError


class LockTimeout(RuntimeError):
    """Another process held a shared lock for too long."""


class RunDirBusy(UserError):
    """Another FineTune command is working on this run directory."""


@contextlib.contextmanager
def waiting_lock(lock_path: Path, timeout_s: float = 900.0) -> Iterator[None]:
    """Wait for an exclusive lock (e.g. one process builds a cached model while others wait)."""
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise LockTimeout(f"timed out after {timeout_s:.0f} s waiting for {lock_path}") from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


LOCK_NAME = ".lock"


@contextlib.contextmanager
def run_dir_lock(run_dir: Path, command: str) -> Iterator[None]:
    """Hold RUN/.lock for the whole command; a second command on the same run dir is refused at once."""
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_NAME
    fh = open(path, "a+")  # noqa: SIM115 - held for the whole block
    try:
        try:
            fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            fh.seek(0)
            try:
                holder = json.loads(fh.read() or "{}")
            except ValueError:
                holder = {}
            raise RunDirBusy(
                f"{run_dir} is in use by `{holder.get('command', 'another finetune command')}` "
                f"(pid {holder.get('pid', '?')}); wait for it to finish or use another --run-dir"
            ) from None
        fh.seek(0)
        fh.truncate()
        fh.write(json.dumps({"pid": os.getpid(), "command": command}))
        fh.flush()
        yield
    finally:
        fh.close()  # closing drops the flock
