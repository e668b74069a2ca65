"""Run history: one JSON line per run of any command (artifacts/history.jsonl), recorded from the run's report.

A record keeps the figures worth comparing across runs (wall times, peak memory, final loss, every gate's
measured value) and three digests saying what the run was made of: the environment (versions, BLAS,
machine), the config (output paths left out) and the data. What the records show over time is in
finetune.report.trends; the check of the latest run against its like is finetune.report.regressions.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from pathlib import Path
from typing import Any

from finetune.report.models import RunReport
from finetune.system.hashing import PACKAGE_ROOT, json_sha256
from finetune.system.jsonl import read_log

HISTORY_NAME = "history.jsonl"
HISTORY_ENV = "FT_HISTORY"
RECORD_VERSION = 1
# Config keys that name where output goes, not what the run does.
OUTPUT_KEYS = frozenset({"output_dir"})
LOSS_WINDOW = 5  # steps averaged for the final loss when no loss_convergence verdict carries it


def history_path(output_dir: str | os.PathLike = "artifacts") -> Path:
    """Where history goes: $FT_HISTORY when set, else <output_dir>/history.jsonl."""
    env = os.environ.get(HISTORY_ENV)
    return Path(env) if env else Path(output_dir) / HISTORY_NAME


def git_commit(cwd: str | os.PathLike = PACKAGE_ROOT) -> str | None:
    """HEAD of the git repository holding `cwd` (by default FineTune's own source), or None outside one."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "HEAD"], cwd=cwd, capture_output=True, text=True, timeout=10
        )
    except (OSError, subprocess.SubprocessError):
        return None
    text = out.stdout.strip()
    return text if out.returncode == 0 and len(text) == 40 else None


def env_digest(environment: dict[str, Any]) -> str:
    """sha256 of what makes timings comparable: versions, BLAS in use and machine; not free memory or disk."""
    mlx, blas = environment.get("mlx") or {}, environment.get("blas") or {}
    comparable = {
        "python": environment.get("python"),
        "machine": environment.get("machine"),
        "cpu_count": environment.get("cpu_count"),
        "packages": environment.get("packages"),
        "mlx": {k: mlx.get(k) for k in ("version", "backend", "default_device")},
        "blas": {k: blas.get(k) for k in ("active", "library")},
        "mlx_compile": environment.get("mlx_compile"),
        "env": environment.get("env"),
    }
    return json_sha256(comparable)


def config_digest(config: dict[str, Any]) -> str:
    """sha256 of the resolved config without output paths: two runs into different folders are the same run."""
    return json_sha256({k: v for k, v in config.items() if k not in OUTPUT_KEYS})


def _data_digest(report: RunReport) -> str | None:
    """The data stage's artifact sha256; a command without a data stage (validate) reads the run's stage record."""
    for stage in report.stages:
        if stage.name == "data" and stage.artifacts:
            return next((a for a in stage.artifacts if a.name == "data"), stage.artifacts[0]).sha256
    try:
        record = json.loads((Path(report.run_dir) / "stages" / "data.json").read_text())
        return record["artifacts"][0]["sha256"]
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        return None


def _final_loss(report: RunReport, train_details: dict[str, Any]) -> float | None:
    """Mean of the last training losses: the loss_convergence verdict's window, else metrics.jsonl."""
    for gate in report.gates:
        if gate.name == "loss_convergence" and isinstance(gate.data.get("final"), int | float):
            return float(gate.data["final"])
    rows = sorted(read_log(Path(report.run_dir) / "metrics.jsonl"), key=lambda r: r.get("step", 0))
    losses = [
        r["train_loss"]
        for r in rows
        if r.get("kind") == "train" and isinstance(r.get("train_loss"), int | float)
    ]
    if losses:
        return float(statistics.fmean(losses[-LOSS_WINDOW:]))
    value = train_details.get("final_train_loss")
    return float(value) if isinstance(value, int | float) else None


_AUTO: Any = object()


def record_from_report(report: RunReport, *, commit: str | None = _AUTO) -> dict[str, Any]:
    """One history row for a finished run of any command; `commit` defaults to FineTune's git HEAD (or None)."""
    train = next((s for s in report.stages if s.name == "train"), None)
    details = train.details if train else {}
    return {
        "version": RECORD_VERSION,
        "when": report.finished_at,
        "started_at": report.started_at,
        "command": report.command,
        "status": report.status,
        "exit_code": report.exit_code,
        "run_dir": report.run_dir,
        "profile": report.profile,
        "model": report.model,
        "faults": list(report.faults),
        "seconds": report.seconds,
        "stages": {
            s.name: {"status": s.status, "seconds": s.seconds, "cached": s.cached} for s in report.stages
        },
        "steps": details.get("steps"),
        "peak_memory_bytes": details.get("peak_memory_bytes"),
        "final_train_loss": _final_loss(report, details),
        "gates": {
            g.name: {"status": g.status, "measured": g.measured, "threshold": g.threshold}
            for g in report.gates
        },
        "env_digest": env_digest(report.environment),
        "config_digest": config_digest(report.config),
        "data_digest": _data_digest(report),
        "commit": git_commit() if commit is _AUTO else commit,
        "code_version": report.code_version,
    }


def _ours(path: Path) -> bool:
    """The file is FineTune's history: empty, or one of its first 3 lines is a run record (a crash may have
    torn the very first)."""
    with open(path, "rb") as fh:
        lines = [line for line in (fh.readline() for _ in range(3)) if line.strip()]
    for line in lines:
        try:
            if {"status", "stages"} <= set(json.loads(line)):
                return True
        except (ValueError, TypeError):
            continue
    return not lines


def append(record: dict[str, Any], path: str | os.PathLike) -> Path:
    """Append one record as one line in one write, flushed and fsynced: a crash tears at most that line.
    A file of that name that is not FineTune's history (output_dir pointed at a user's folder) is left alone."""
    path = Path(path)
    if path.is_file() and not _ours(path):
        raise ValueError(
            f"{path} is not FineTune's history (no run record in its first lines); set {HISTORY_ENV}"
        )
    path.parent.mkdir(parents=True, exist_ok=True)
    line = json.dumps(record, ensure_ascii=False, default=str) + "\n"
    with open(path, "ab") as fh:
        if fh.tell() > 0:  # a torn last line (crash mid-write) must not swallow this record
            with open(path, "rb") as last:
                last.seek(-1, os.SEEK_END)
                if last.read(1) != b"\n":
                    line = "\n" + line
        fh.write(line.encode("utf-8"))
        fh.flush()
        os.fsync(fh.fileno())
    return path


def load(path: str | os.PathLike) -> list[dict[str, Any]]:
    """Every record in file order; a missing file is an empty history and a torn line is skipped. A record
    written before report schema 3 names its command "tier"."""
    rows = [r for r in read_log(path) if isinstance(r, dict) and "status" in r]
    return [
        r if "command" in r else {**r, "command": r["tier"]} for r in rows if "command" in r or "tier" in r
    ]
