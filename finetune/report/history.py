"""Run history: one JSON line per tier run (artifacts/history.jsonl), trends per tier, and a regression check
of the latest run against the medians of earlier runs made under the same conditions.

A record keeps the figures worth comparing across runs (wall times, peak memory, final loss, every gate's
measured value) and three digests saying what the run was made of: the environment (versions, BLAS,
machine), the config (output paths left out) and the data. `check` compares like with like: the latest run
against earlier runs with equal digests, or, when there are none, against the same tier and config.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from finetune.report.models import RunReport
from finetune.system.hashing import PACKAGE_ROOT, json_sha256
from finetune.system.jsonl import read_log

HISTORY_NAME = "history.jsonl"
HISTORY_ENV = "FT_HISTORY"
RECORD_VERSION = 1
# Gates whose measured value must stay at or below the threshold; every other gate passes at or above it.
LOWER_IS_BETTER = frozenset({"loss_convergence", "logprob_parity", "fuse_exactness"})
# Agreement-type parity gates (share of equal answers) and the logprob gate (max |diff|, lower is better).
PARITY_GATES = ("output_parity", "served_answers", "logprob_parity")
# How bad a status is; a run whose status ranks higher than its baseline's got worse.
STATUS_RANK = {"passed": 0, "not_judged": 0, "degraded": 1, "interrupted": 2, "failed": 3, "bad_input": 3,
               "fault_injected": 3}  # fmt: skip
# Runs that stopped early or were broken on purpose say nothing about how long or how well a run goes.
NOT_BASELINE = frozenset({"interrupted", "bad_input", "running", "fault_injected"})
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
    return json_sha256({
        "python": environment.get("python"), "machine": environment.get("machine"),
        "cpu_count": environment.get("cpu_count"), "packages": environment.get("packages"),
        "mlx": {k: mlx.get(k) for k in ("version", "backend", "default_device")},
        "blas": {k: blas.get(k) for k in ("active", "library")},
        "mlx_compile": environment.get("mlx_compile"), "env": environment.get("env"),
    })  # fmt: skip


def config_digest(config: dict[str, Any]) -> str:
    """sha256 of the resolved config without output paths: two runs into different folders are the same run."""
    return json_sha256({k: v for k, v in config.items() if k not in OUTPUT_KEYS})


def _data_digest(report: RunReport) -> str | None:
    """The data stage's artifact sha256; a tier without a data stage (validate) reads the run's stage record."""
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
    rows = read_log(Path(report.run_dir) / "metrics.jsonl")
    losses = [r["train_loss"] for r in sorted(rows, key=lambda r: r.get("step", 0))
              if r.get("kind") == "train" and isinstance(r.get("train_loss"), int | float)]  # fmt: skip
    if losses:
        return float(statistics.fmean(losses[-LOSS_WINDOW:]))
    value = train_details.get("final_train_loss")
    return float(value) if isinstance(value, int | float) else None


_AUTO: Any = object()


def record_from_report(report: RunReport, *, commit: str | None = _AUTO) -> dict[str, Any]:
    """One history row for a finished run of any tier; `commit` defaults to FineTune's git HEAD (or None)."""
    train = next((s for s in report.stages if s.name == "train"), None)
    details = train.details if train else {}
    return {
        "version": RECORD_VERSION,
        "when": report.finished_at,
        "started_at": report.started_at,
        "tier": report.tier,
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


def append(record: dict[str, Any], path: str | os.PathLike) -> Path:
    """Append one record as one line in one write, flushed and fsynced: a crash tears at most that line."""
    path = Path(path)
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
    """Every record in file order; a missing file is an empty history and a torn line is skipped."""
    return [r for r in read_log(path) if isinstance(r, dict) and "tier" in r and "status" in r]


# ---------------------------------------------------------------- trends


def _median(values: Iterable[Any]) -> float | None:
    nums = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    return statistics.median(nums) if nums else None


def _fresh_stage_seconds(row: dict[str, Any], name: str) -> float | None:
    """A stage's time when it really ran and passed; a cached or failed stage's time is not its cost."""
    s = row.get("stages", {}).get(name) or {}
    return s.get("seconds") if s.get("status") == "passed" and not s.get("cached") else None


def _fresh(row: dict[str, Any]) -> bool:
    return not any(s.get("cached") for s in row.get("stages", {}).values())


@dataclass
class TierTrend:
    tier: str
    total_runs: int
    runs: list[dict[str, Any]]  # the last N records, oldest first
    pass_rate: float
    median_seconds: float | None
    stage_medians: dict[str, float | None] = field(default_factory=dict)
    gate_medians: dict[str, float | None] = field(default_factory=dict)
    peak_memory_median: float | None = None


def trends(rows: Sequence[dict[str, Any]], tier: str | None = None, last: int = 10) -> dict[str, TierTrend]:
    """Per tier (or one tier): the last `last` runs, their pass rate and the medians of times and gates."""
    out: dict[str, TierTrend] = {}
    for name in dict.fromkeys(r["tier"] for r in rows if tier in (None, r["tier"])):
        mine = [r for r in rows if r["tier"] == name]
        recent = mine[-last:]
        stages = dict.fromkeys(s for r in recent for s in r.get("stages", {}))
        gates = dict.fromkeys(g for r in recent for g in r.get("gates", {}))
        out[name] = TierTrend(
            tier=name,
            total_runs=len(mine),
            runs=recent,
            pass_rate=sum(r["status"] in ("passed", "not_judged") for r in recent) / len(recent),
            median_seconds=_median(r.get("seconds") for r in recent if _fresh(r)),
            stage_medians={s: _median(_fresh_stage_seconds(r, s) for r in recent) for s in stages},
            gate_medians={
                g: _median((r["gates"].get(g) or {}).get("measured") for r in recent) for g in gates
            },
            peak_memory_median=_median(r.get("peak_memory_bytes") for r in recent),
        )
    return out


def _num(x: Any) -> str:
    return "-" if not isinstance(x, int | float) else f"{x:.4g}"


def _mib(x: Any) -> str:
    return "-" if not isinstance(x, int | float) else f"{x / 2**20:.0f} MiB"


def render_trends(by_tier: dict[str, TierTrend]) -> str:
    """Plain text for `finetune history`: per tier, each recent run's times and gate values, then medians."""
    if not by_tier:
        return "no runs in the history yet"
    lines: list[str] = []
    for t in by_tier.values():
        lines.append(f"{t.tier}: {t.total_runs} runs; last {len(t.runs)}: pass rate {t.pass_rate:.0%}, "
                     f"median {_num(t.median_seconds)} s, peak memory {_mib(t.peak_memory_median)}")  # fmt: skip
        for r in t.runs:
            commit = (r.get("commit") or "-")[:10]
            stages = ", ".join(f"{n} {_num(s.get('seconds'))}{'*' if s.get('cached') else ''}"
                               for n, s in r.get("stages", {}).items())  # fmt: skip
            lines.append(f"  {r.get('when', '?'):25} {r['status']:11} {_num(r.get('seconds')):>8} s  "
                         f"commit {commit}  [{stages}]")  # fmt: skip
            gates = ", ".join(f"{n} {_num(g.get('measured'))}{'' if g.get('status') == 'passed' else ' ' + g.get('status', '?').upper()}"
                              for n, g in r.get("gates", {}).items())  # fmt: skip
            if gates:
                lines.append(f"  {'':25} gates: {gates}")
        medians = ", ".join(f"{n} {_num(v)}" for n, v in t.gate_medians.items())
        if medians:
            lines.append(f"  median gate values: {medians}")
        if any(s.get("cached") for r in t.runs for s in r.get("stages", {}).values()):
            lines.append("  (* = cached stage: not rerun, not timed)")
    return "\n".join(lines)


# ---------------------------------------------------------------- regression check


@dataclass
class Finding:
    figure: str  # what was compared, e.g. "stage train seconds"
    baseline: Any
    latest: Any
    band: str  # the allowed difference, in words
    detail: str
    severity: Literal["regression", "note"] = "regression"

    def __str__(self) -> str:
        if self.severity == "note":
            return f"[note] {self.figure}: {self.detail}"
        return f"[REGRESSION] {self.figure}: baseline {_show(self.baseline)}, latest {_show(self.latest)} " \
               f"({self.band}): {self.detail}"  # fmt: skip


def _show(x: Any) -> str:
    return _num(x) if isinstance(x, float) else str(x)


def regressions(findings: Sequence[Finding]) -> list[Finding]:
    """The findings that should fail `finetune history --check` (notes only explain the comparison)."""
    return [f for f in findings if f.severity == "regression"]


def baseline_for(rows: Sequence[dict], latest: dict, last: int = 5) -> tuple[list[dict], str]:
    """Up to `last` earlier runs like `latest` (same env, config and data digests; if none, same tier and
    config), leaving out interrupted, bad-input and fault-injected runs; and which kind of match it is."""
    earlier = [r for r in rows if r is not latest and r["tier"] == latest["tier"]
               and r.get("status") not in NOT_BASELINE and not r.get("faults")]  # fmt: skip
    keys = ("env_digest", "config_digest", "data_digest")
    same = [r for r in earlier if all(r.get(k) == latest.get(k) for k in keys)]
    if same:
        return same[-last:], "same environment, config and data"
    loose = [r for r in earlier if r.get("config_digest") == latest.get("config_digest")]
    differ = [k[:-7] for k in keys if loose and loose[-1].get(k) != latest.get(k)]
    return loose[-last:], f"same tier and config ({' and '.join(differ)} differ: figures less comparable)"


def _worse(name: str, value: float, threshold: float) -> bool:
    return value > threshold if name in LOWER_IS_BETTER else value < threshold


def _majority(values: Iterable[Any]) -> Any:
    values = [v for v in values if v is not None]
    return max(set(values), key=values.count) if values else None


def _higher(
    figure: str, old: float | None, new: Any, band: float, floor: float = 0.0, unit: str = ""
) -> list:
    """A finding when `new` exceeds the baseline median by more than the band (and the absolute floor)."""
    if old is None or not isinstance(new, int | float) or new <= old * (1 + band) or new - old <= floor:
        return []
    pct = f"+{new / old - 1:.0%}" if old else "from 0"
    return [Finding(figure, old, float(new), f"band +{band:.0%} of the baseline median",
                    f"{_num(new)}{unit} vs median {_num(old)}{unit} ({pct})")]  # fmt: skip


def _gate_findings(latest: dict, base: list[dict], loss_band: float, parity_tol: float) -> list[Finding]:
    out: list[Finding] = []
    for name, gate in latest.get("gates", {}).items():
        olds = [r.get("gates", {}).get(name) or {} for r in base]
        old_status, old = _majority(g.get("status") for g in olds), _median(g.get("measured") for g in olds)
        new, thr = gate.get("measured"), gate.get("threshold")
        numbers = isinstance(new, int | float) and old is not None
        if old_status == "passed" and gate.get("status") == "failed":
            out.append(Finding(f"gate {name}", "passed", "failed", "a passing gate must keep passing",
                               f"measured {_num(new)} vs threshold {_num(thr)} (baseline median {_num(old)})"))  # fmt: skip
        elif (
            numbers and isinstance(thr, int | float) and not _worse(name, old, thr) and _worse(name, new, thr)
        ):
            out.append(Finding(f"gate {name} measured", old, float(new), f"threshold {_num(thr)}",
                               f"crossed its threshold (status {gate.get('status')})"))  # fmt: skip
        elif numbers and name in PARITY_GATES:
            lower = name in LOWER_IS_BETTER  # logprob_parity: the tolerance is a share of its threshold
            tol = parity_tol * (thr or 1.0) if lower else parity_tol
            drop = new - old if lower else old - new
            if drop > tol:
                out.append(Finding(f"gate {name} measured", old, float(new), f"tolerance {_num(tol)}",
                                   f"parity worse by {_num(drop)}"))  # fmt: skip
        elif numbers and name == "loss_convergence":
            out += _higher("gate loss_convergence measured (final/initial loss)", old, new, loss_band)
    return out


def check(rows: Sequence[dict[str, Any]], *, tier: str | None = None, time_band: float = 0.25,
          loss_band: float = 0.25, memory_band: float = 0.25, parity_tol: float = 0.05, min_runs: int = 3,
          last: int = 5, time_floor: float = 1.0) -> list[Finding]:  # fmt: skip
    """Compare the latest run (of `tier`, if given) with the medians of its baseline (see baseline_for).

    Regressions: status worse; a gate that passed in most baseline runs now failing; a gate value crossing
    its threshold; parity worse than the baseline by more than `parity_tol` (agreement share, or that share
    of the logprob tolerance); final train loss or the loss_convergence ratio above median x (1 + loss_band);
    peak memory above median x (1 + memory_band); a stage or the whole run slower than median x (1 +
    time_band) and by more than `time_floor` seconds (timings need `min_runs` baseline runs: the machine is
    noisy). Notes (severity "note") say which baseline was used and what could not be compared.
    """
    mine = [r for r in rows if tier in (None, r["tier"])]
    if not mine:
        return [Finding("history", None, None, "-", f"no runs recorded (tier {tier or 'any'})", "note")]
    latest = mine[-1]
    base, kind = baseline_for(rows, latest, last)
    who = f"{latest['tier']} run {latest.get('run_dir')} ({latest.get('when')})"
    if not base:
        return [Finding("baseline", None, None, "-", f"{who}: no earlier run of its tier and config", "note")]
    out = [Finding("baseline", f"{len(base)} runs", latest.get("when"), "-", f"{who} vs {kind}", "note")]
    statuses = [r["status"] for r in base]
    if STATUS_RANK.get(latest["status"], 3) > STATUS_RANK.get(_majority(statuses), 3):
        out.append(Finding("status", _majority(statuses), latest["status"], "no worse than the baseline's",
                           f"exit code {latest.get('exit_code')}; baseline statuses {statuses}"))  # fmt: skip
    out += _gate_findings(latest, base, loss_band, parity_tol)
    out += _higher("final train loss", _median(r.get("final_train_loss") for r in base),
                   latest.get("final_train_loss"), loss_band)  # fmt: skip
    mib = [
        r["peak_memory_bytes"] / 2**20 for r in base if isinstance(r.get("peak_memory_bytes"), int | float)
    ]
    new_mib = latest.get("peak_memory_bytes")
    new_mib = new_mib / 2**20 if isinstance(new_mib, int | float) else None
    out += _higher("peak memory", _median(mib), new_mib, memory_band, unit=" MiB")
    if len(base) < min_runs:
        out.append(Finding("times", f"{len(base)} runs", None, f"needs {min_runs} baseline runs",
                           "not compared: too few baseline runs for medians on a noisy machine", "note"))  # fmt: skip
        return out
    for name in latest.get("stages", {}):
        old = _median(_fresh_stage_seconds(r, name) for r in base)
        new = _fresh_stage_seconds(latest, name)
        out += _higher(f"stage {name} seconds", old, new, time_band, time_floor, " s")
    if _fresh(latest):
        old = _median(r.get("seconds") for r in base if _fresh(r))
        out += _higher("total seconds", old, latest.get("seconds"), time_band, time_floor, " s")
    return out


def render_check(findings: Sequence[Finding]) -> str:
    """Plain text for `finetune history --check`: every finding, then the verdict line."""
    bad = regressions(findings)
    lines = [str(f) for f in findings]
    lines.append(f"history check: {len(bad)} regression(s)" if bad else "history check: no regression")
    return "\n".join(lines)
