"""Drive the real `finetune` CLI as a shell would, interrupt it, and watch every process it starts.

The CLI runs in a process group of its own, like a foreground job: SIGINT goes to the whole group (what
Ctrl-C in a terminal does), SIGTERM/SIGHUP/SIGKILL to the CLI's pid only (what `kill`, CI cancel or a
container stop do). A monitor thread records every descendant it ever sees (pid + start time), so an orphan
is found whether or not FineTune recorded it; the pid files the run wrote are checked as well.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shlex
import signal
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from finetune.system import procs

FINETUNE = Path(sys.executable).with_name("finetune")
EXIT = {signal.SIGINT: 130, signal.SIGTERM: 143, signal.SIGHUP: 129, signal.SIGKILL: -signal.SIGKILL}


def _default_signals() -> None:
    # A non-interactive shell starts background jobs with SIGINT ignored; Ctrl-C must reach the CLI.
    for sig in (signal.SIGINT, signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, signal.SIG_DFL)


@dataclass
class Seen:
    pid: int
    started: float
    cmd: str


@dataclass
class Cli:
    """One `finetune ...` command, its output lines and every process below it."""

    args: list[str]
    env: dict[str, str]
    lines: list[str] = field(default_factory=list)
    seen: dict[int, Seen] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.tic = time.monotonic()
        self.proc = subprocess.Popen(
            [str(FINETUNE), *self.args], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, bufsize=1,
            env=self.env, start_new_session=True, preexec_fn=_default_signals,  # noqa: PLW1509
        )  # fmt: skip
        self._cond = threading.Condition()
        threading.Thread(target=self._read, daemon=True).start()
        threading.Thread(target=self._monitor, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            with self._cond:
                self.lines.append(line.rstrip("\n"))
                self._cond.notify_all()
        with self._cond:
            self._cond.notify_all()

    def _monitor(self) -> None:
        while self.proc.poll() is None:
            self.watch()
            time.sleep(0.02)

    def watch(self) -> None:
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if child.pid not in self.seen:
                        self.seen[child.pid] = Seen(
                            child.pid, child.create_time(), " ".join(child.cmdline())[:200]
                        )

    def wait_line(self, pattern: str, timeout: float) -> str | None:
        """The first output line matching pattern (searched from the start), or None if the CLI ended first."""
        rx = re.compile(pattern)
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hit = next((ln for ln in self.lines if rx.search(ln)), None)
                if hit is not None:
                    return hit
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    return None
                self._cond.wait(0.1)

    def descendants(self, pattern: str) -> list[psutil.Process]:
        found = []
        with contextlib.suppress(psutil.Error):
            for child in psutil.Process(self.proc.pid).children(recursive=True):
                with contextlib.suppress(psutil.Error):
                    if re.search(pattern, " ".join(child.cmdline())):
                        found.append(child)
        return found

    def send(self, sig: signal.Signals) -> None:
        self.watch()
        if sig == signal.SIGINT:
            os.killpg(self.proc.pid, sig)  # Ctrl-C: the terminal signals the foreground process group
        else:
            os.kill(self.proc.pid, sig)

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
            raise AssertionError(f"`finetune {' '.join(self.args)}` still ran after {timeout:.0f} s:\n"
                                 + "\n".join(self.lines[-40:])) from None  # fmt: skip
        self.seconds = time.monotonic() - self.tic
        time.sleep(0.2)  # let the reader thread drain the pipe
        return code

    @property
    def output(self) -> str:
        return "\n".join(self.lines)

    def resume_command(self) -> list[str] | None:
        """The arguments of the `resume with: finetune ...` line the CLI printed, if it printed one."""
        hit = next((ln for ln in self.lines if "resume with: finetune " in ln), None)
        return shlex.split(hit.split("resume with: finetune ", 1)[1]) if hit else None


def orphans(cli: Cli, run_dir: Path, grace: float = 10.0) -> list[str]:
    """Processes of the run still alive `grace` seconds after the CLI exited (then killed, so that one
    failure does not spill into the next case): every descendant seen, and every pid the run recorded."""
    records = [r for d in run_dir.rglob(procs.PID_DIR) if d.is_dir() for r in procs.recorded(d)]

    def alive() -> list[str]:
        out = [
            f"{s.cmd} (pid {s.pid})"
            for s in cli.seen.values()
            if procs.alive({"pid": s.pid, "started": s.started})
        ]
        out += [f"{r['name']} (pid {r['pid']}, recorded)" for r in records if procs.alive(r)
                and r["pid"] not in cli.seen]  # fmt: skip
        return out

    deadline = time.monotonic() + grace
    while (left := alive()) and time.monotonic() < deadline:
        time.sleep(0.1)
    for s in cli.seen.values():
        if procs.alive({"pid": s.pid, "started": s.started}):
            with contextlib.suppress(ProcessLookupError):
                os.kill(s.pid, signal.SIGKILL)
    return left


def completed_artifacts(run_dir: Path) -> dict[str, tuple[str, int]]:
    """path -> (sha256, bytes) of every artifact a finished stage recorded in RUN/stages."""
    out = {}
    for record in sorted((run_dir / "stages").glob("*.json")):
        with contextlib.suppress(OSError, ValueError):
            for a in json.loads(record.read_text()).get("artifacts", []):
                if Path(a["path"]).is_relative_to(run_dir):
                    out[a["path"]] = (a["sha256"], int(a.get("bytes") or 0))
    return out


def sha256_path(path: Path) -> str | None:
    """The digest report artifacts carry (finetune.report.artifacts), or None if the path is gone."""
    from finetune.report.artifacts import artifact

    return artifact("x", path).sha256 if path.exists() else None


def bytes_lost(before: dict[str, tuple[str, int]]) -> tuple[int, list[str]]:
    """Bytes of artifacts that were complete before an interruption and are changed or gone after it."""
    lost, names = 0, []
    for path, (digest, size) in before.items():
        if sha256_path(Path(path)) != digest:
            lost += size
            names.append(path)
    return lost, names


def stray_temporaries(run_dir: Path) -> list[str]:
    from finetune.system.atomic import STALE_PATTERNS

    return sorted(str(p.relative_to(run_dir)) for pat in STALE_PATTERNS for p in run_dir.rglob(pat))


def losses(run_dir: Path) -> dict[tuple[str, int], float]:
    out = {}
    for line in (run_dir / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        key = "train_loss" if row["kind"] == "train" else "val_loss"
        out[(row["kind"], row["step"])] = row[key]
    return out
