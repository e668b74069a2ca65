"""The regression check of the run history: the latest run against the medians of earlier runs made under the
same conditions (equal environment, config and data digests; when there are none, the same command and config).
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

# Which gates must stay at or below their threshold, and which compare runtimes: the gate table says.
from finetune.gates.registry import LOWER_IS_BETTER, PARITY_GATES
from finetune.report.trends import fresh_stage_seconds, median_of, ran_fresh, show_number

# How bad a status is; a run whose status ranks higher than its baseline's got worse.
STATUS_RANK = {
    "passed": 0,
    "not_judged": 0,
    "degraded": 1,
    "interrupted": 2,
    "failed": 3,
    "bad_input": 3,
    "fault_injected": 3,
}
# Runs that stopped early or were broken on purpose say nothing about how long or how well a run goes.
NOT_BASELINE = frozenset({"interrupted", "bad_input", "running", "fault_injected"})


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
        compared = f"baseline {_show(self.baseline)}, latest {_show(self.latest)}"
        return f"[REGRESSION] {self.figure}: {compared} ({self.band}): {self.detail}"


def _show(x: Any) -> str:
    return show_number(x) if isinstance(x, float) else str(x)


def _note(figure: str, baseline: Any, latest: Any, band: str, detail: str) -> Finding:
    return Finding(figure, baseline, latest, band, detail, "note")


def regressions(findings: Sequence[Finding]) -> list[Finding]:
    """The findings that should fail `finetune history --check` (notes only explain the comparison)."""
    return [f for f in findings if f.severity == "regression"]


def baseline_for(rows: Sequence[dict], latest: dict, last: int = 5) -> tuple[list[dict], str]:
    """Up to `last` earlier runs like `latest` (same env, config and data digests; if none, same command and
    config), leaving out interrupted, bad-input and fault-injected runs; and which kind of match it is."""

    def comparable(r: dict) -> bool:
        return (
            r["command"] == latest["command"] and r.get("status") not in NOT_BASELINE and not r.get("faults")
        )

    earlier = [r for r in rows if r is not latest and comparable(r)]
    keys = ("env_digest", "config_digest", "data_digest")
    same = [r for r in earlier if all(r.get(k) == latest.get(k) for k in keys)]
    if same:
        return same[-last:], "same environment, config and data"
    loose = [r for r in earlier if r.get("config_digest") == latest.get("config_digest")]
    differ = [k[:-7] for k in keys if loose and loose[-1].get(k) != latest.get(k)]
    return loose[-last:], f"same command and config ({' and '.join(differ)} differ: figures less comparable)"


def _worse(name: str, value: float, threshold: float) -> bool:
    return value > threshold if name in LOWER_IS_BETTER else value < threshold


def _majority(values: Iterable[Any]) -> Any:
    values = [v for v in values if v is not None]
    return max(set(values), key=values.count) if values else None


def _higher(
    figure: str, old: float | None, new: Any, band: float, floor: float = 0.0, unit: str = ""
) -> list[Finding]:
    """A finding when `new` exceeds the baseline median by more than the band (and the absolute floor)."""
    if old is None or not isinstance(new, int | float) or new <= old * (1 + band) or new - old <= floor:
        return []
    pct = f"+{new / old - 1:.0%}" if old else "from 0"
    detail = f"{show_number(new)}{unit} vs median {show_number(old)}{unit} ({pct})"
    return [Finding(figure, old, float(new), f"band +{band:.0%} of the baseline median", detail)]


def _gate_findings(latest: dict, base: list[dict], loss_band: float, parity_tol: float) -> list[Finding]:
    out: list[Finding] = []
    for name, gate in latest.get("gates", {}).items():
        olds = [r.get("gates", {}).get(name) or {} for r in base]
        old_status, old = _majority(g.get("status") for g in olds), median_of(g.get("measured") for g in olds)
        new, thr = gate.get("measured"), gate.get("threshold")
        numbers = isinstance(new, int | float) and old is not None
        figure = f"gate {name} measured"
        if old_status == "passed" and gate.get("status") == "failed":
            detail = f"measured {show_number(new)} vs threshold {show_number(thr)} (baseline median {show_number(old)})"
            out.append(
                Finding(f"gate {name}", "passed", "failed", "a passing gate must keep passing", detail)
            )
        elif (
            numbers and isinstance(thr, int | float) and not _worse(name, old, thr) and _worse(name, new, thr)
        ):
            detail = f"crossed its threshold (status {gate.get('status')})"
            out.append(Finding(figure, old, float(new), f"threshold {show_number(thr)}", detail))
        elif numbers and name in PARITY_GATES:
            out += _parity_finding(name, old, new, thr, parity_tol)
        elif numbers and name == "loss_convergence":
            out += _higher("gate loss_convergence measured (final/initial loss)", old, new, loss_band)
    return out


def _parity_finding(name: str, old: float, new: float, thr: Any, parity_tol: float) -> list[Finding]:
    lower = name in LOWER_IS_BETTER  # logprob_parity: the tolerance is a share of its threshold
    tol = parity_tol * (thr or 1.0) if lower else parity_tol
    drop = new - old if lower else old - new
    if drop <= tol:
        return []
    detail = f"parity worse by {show_number(drop)}"
    return [Finding(f"gate {name} measured", old, float(new), f"tolerance {show_number(tol)}", detail)]


def check(
    rows: Sequence[dict[str, Any]],
    *,
    command: str | None = None,
    time_band: float = 0.25,
    loss_band: float = 0.25,
    memory_band: float = 0.25,
    parity_tol: float = 0.05,
    min_runs: int = 3,
    last: int = 5,
    time_floor: float = 1.0,
) -> list[Finding]:
    """Compare the latest run (of `command`, if given) with the medians of its baseline (see baseline_for).

    Regressions: status worse; a gate that passed in most baseline runs now failing; a gate value crossing
    its threshold; parity worse than the baseline by more than `parity_tol` (agreement share, or that share
    of the logprob tolerance); final train loss or the loss_convergence ratio above median x (1 + loss_band);
    peak memory above median x (1 + memory_band); a stage or the whole run slower than median x (1 +
    time_band) and by more than `time_floor` seconds (timings need `min_runs` baseline runs: the machine is
    noisy). Notes (severity "note") say which baseline was used and what could not be compared.
    """
    mine = [r for r in rows if command in (None, r["command"])]
    if not mine:
        return [_note("history", None, None, "-", f"no runs recorded (command {command or 'any'})")]
    latest = mine[-1]
    base, kind = baseline_for(rows, latest, last)
    who = f"{latest['command']} run {latest.get('run_dir')} ({latest.get('when')})"
    if not base:
        return [_note("baseline", None, None, "-", f"{who}: no earlier run of its command and config")]
    out = [_note("baseline", f"{len(base)} runs", latest.get("when"), "-", f"{who} vs {kind}")]
    out += _status_finding(latest, base)
    out += _gate_findings(latest, base, loss_band, parity_tol)
    old_loss = median_of(r.get("final_train_loss") for r in base)
    out += _higher("final train loss", old_loss, latest.get("final_train_loss"), loss_band)
    out += _memory_finding(latest, base, memory_band)
    if len(base) < min_runs:
        why = "not compared: too few baseline runs for medians on a noisy machine"
        out.append(_note("times", f"{len(base)} runs", None, f"needs {min_runs} baseline runs", why))
        return out
    return out + _time_findings(latest, base, time_band, time_floor)


def _status_finding(latest: dict, base: list[dict]) -> list[Finding]:
    statuses = [r["status"] for r in base]
    usual = _majority(statuses)
    if STATUS_RANK.get(latest["status"], 3) <= STATUS_RANK.get(usual, 3):
        return []
    detail = f"exit code {latest.get('exit_code')}; baseline statuses {statuses}"
    return [Finding("status", usual, latest["status"], "no worse than the baseline's", detail)]


def _memory_finding(latest: dict, base: list[dict], memory_band: float) -> list[Finding]:
    def mib(r: dict) -> float | None:
        peak = r.get("peak_memory_bytes")
        return peak / 2**20 if isinstance(peak, int | float) else None

    return _higher("peak memory", median_of(mib(r) for r in base), mib(latest), memory_band, unit=" MiB")


def _time_findings(latest: dict, base: list[dict], time_band: float, time_floor: float) -> list[Finding]:
    out: list[Finding] = []
    for name in latest.get("stages", {}):
        old = median_of(fresh_stage_seconds(r, name) for r in base)
        new = fresh_stage_seconds(latest, name)
        out += _higher(f"stage {name} seconds", old, new, time_band, time_floor, " s")
    if ran_fresh(latest):
        old = median_of(r.get("seconds") for r in base if ran_fresh(r))
        out += _higher("total seconds", old, latest.get("seconds"), time_band, time_floor, " s")
    return out


def render_check(findings: Sequence[Finding]) -> str:
    """Plain text for `finetune history --check`: every finding, then the verdict line."""
    bad = regressions(findings)
    lines = [str(f) for f in findings]
    lines.append(f"history check: {len(bad)} regression(s)" if bad else "history check: no regression")
    return "\n".join(lines)
