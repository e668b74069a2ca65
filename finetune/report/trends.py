"""Trends of the run history: per command, the last runs, their pass rate and the medians of times, memory and gates.

Only stages that really ran count for time: a cached stage's 0 s and a failed stage's time are not its cost.
"""

from __future__ import annotations

import statistics
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from typing import Any


def median_of(values: Iterable[Any]) -> float | None:
    """The median of the numbers among `values` (None, text and booleans are left out); None if none."""
    nums = [float(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool)]
    return statistics.median(nums) if nums else None


def fresh_stage_seconds(row: dict[str, Any], name: str) -> float | None:
    """A stage's time when it really ran and passed; a cached or failed stage's time is not its cost."""
    s = row.get("stages", {}).get(name) or {}
    return s.get("seconds") if s.get("status") == "passed" and not s.get("cached") else None


def ran_fresh(row: dict[str, Any]) -> bool:
    """No stage of the run came from the cache: its total time is a real run's."""
    return not any(s.get("cached") for s in row.get("stages", {}).values())


def show_number(x: Any) -> str:
    return "-" if not isinstance(x, int | float) else f"{x:.4g}"


@dataclass
class CommandTrend:
    command: str
    total_runs: int
    runs: list[dict[str, Any]]  # the last N records, oldest first
    pass_rate: float
    median_seconds: float | None
    stage_medians: dict[str, float | None] = field(default_factory=dict)
    gate_medians: dict[str, float | None] = field(default_factory=dict)
    peak_memory_median: float | None = None


def trends(
    rows: Sequence[dict[str, Any]], command: str | None = None, last: int = 10
) -> dict[str, CommandTrend]:
    """Per command (or one command): the last `last` runs, their pass rate and the medians of times and gates."""
    out: dict[str, CommandTrend] = {}
    for name in dict.fromkeys(r["command"] for r in rows if command in (None, r["command"])):
        mine = [r for r in rows if r["command"] == name]
        out[name] = _trend(name, mine, mine[-last:])
    return out


def _trend(name: str, mine: list[dict[str, Any]], recent: list[dict[str, Any]]) -> CommandTrend:
    stages = dict.fromkeys(s for r in recent for s in r.get("stages", {}))
    gates = dict.fromkeys(g for r in recent for g in r.get("gates", {}))

    def gate_median(g: str) -> float | None:
        return median_of((r["gates"].get(g) or {}).get("measured") for r in recent)

    return CommandTrend(
        command=name,
        total_runs=len(mine),
        runs=recent,
        pass_rate=sum(r["status"] in ("passed", "not_judged") for r in recent) / len(recent),
        median_seconds=median_of(r.get("seconds") for r in recent if ran_fresh(r)),
        stage_medians={s: median_of(fresh_stage_seconds(r, s) for r in recent) for s in stages},
        gate_medians={g: gate_median(g) for g in gates},
        peak_memory_median=median_of(r.get("peak_memory_bytes") for r in recent),
    )


def _mib(x: Any) -> str:
    return "-" if not isinstance(x, int | float) else f"{x / 2**20:.0f} MiB"


def render_trends(by_command: dict[str, CommandTrend]) -> str:
    """Plain text for `finetune history`: per command, each recent run's times and gate values, then medians."""
    if not by_command:
        return "no runs in the history yet"
    lines: list[str] = []
    for t in by_command.values():
        summary = f"median {show_number(t.median_seconds)} s, peak memory {_mib(t.peak_memory_median)}"
        lines.append(
            f"{t.command}: {t.total_runs} runs; last {len(t.runs)}: pass rate {t.pass_rate:.0%}, {summary}"
        )
        for r in t.runs:
            lines += _run_lines(r)
        medians = ", ".join(f"{n} {show_number(v)}" for n, v in t.gate_medians.items())
        if medians:
            lines.append(f"  median gate values: {medians}")
        if any(s.get("cached") for r in t.runs for s in r.get("stages", {}).values()):
            lines.append("  (* = cached stage: not rerun, not timed)")
    return "\n".join(lines)


def _run_lines(r: dict[str, Any]) -> list[str]:
    """One run: when, status, time, commit and its stages' times; then its gates' values, failures in capitals."""
    commit = (r.get("commit") or "-")[:10]
    stages = ", ".join(
        f"{n} {show_number(s.get('seconds'))}{'*' if s.get('cached') else ''}"
        for n, s in r.get("stages", {}).items()
    )
    seconds = show_number(r.get("seconds"))
    lines = [f"  {r.get('when', '?'):25} {r['status']:11} {seconds:>8} s  commit {commit}  [{stages}]"]
    gates = ", ".join(_gate_value(n, g) for n, g in r.get("gates", {}).items())
    if gates:
        lines.append(f"  {'':25} gates: {gates}")
    return lines


def _gate_value(name: str, gate: dict[str, Any]) -> str:
    status = "" if gate.get("status") == "passed" else " " + gate.get("status", "?").upper()
    return f"{name} {show_number(gate.get('measured'))}{status}"
