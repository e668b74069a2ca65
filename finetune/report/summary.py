"""The console summary of a run report: stages, every gate with measured vs threshold, scores, what to do next."""

from __future__ import annotations

from finetune.report.forms import HEADERS, form_rows
from finetune.report.models import RunReport

MARK = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP"}


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4g}"


def render_summary(report: RunReport) -> str:
    lines = [
        f"{report.command} {report.status.upper()} (exit {report.exit_code}) in {report.seconds:.0f} s: {report.run_dir}"
    ]
    for s in report.stages:
        note = f"  {s.reason}" if s.reason else ""
        lines.append(f"  {s.status:8} {s.name:9} {s.seconds:7.1f} s{' (cached)' if s.cached else ''}{note}")
    for g in report.gates:
        lines.append(
            f"  [{MARK[g.status]}] {g.name}: measured {_num(g.measured)} vs {_num(g.threshold)}: {g.detail}"
        )
    for sc in report.scores:
        train, heldout = f"{sc.train.contains}/{sc.train.n}", f"{sc.heldout.contains}/{sc.heldout.n}"
        lines.append(f"  score {sc.runtime:12} train {train}  heldout {heldout}")
    if rows := form_rows(report):  # what the run shipped besides the judged GGUF
        lines.append("  shipped: " + " | ".join(HEADERS))
        lines.extend("  shipped: " + " | ".join(row) for row in rows)
    for reason in report.reasons:
        lines.append(f"  ! {reason}")
    for allowed in report.allowed_skips:
        lines.append(f"  allowed: {allowed}")
    if report.faults:
        lines.append(f"  injected faults: {', '.join(report.faults)}")
    if report.resume_command:
        lines.append(f"interrupted; resume with: {report.resume_command}")
    return "\n".join(lines)
