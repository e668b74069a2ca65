"""Trends of the run history: per tier, the recent runs with their times and gate values, and their medians."""

from __future__ import annotations

import pytest

from finetune.report import trends
from tests.unit.report.report_builders import make_report
from tests.unit.report.test_history import rec


def test_trends_show_both_runs_with_their_times_and_gate_values():
    rows = [
        rec(
            make_report(seconds={"train": 101.5}, gates={"loss_convergence": 0.2345}, when="2026-11-01T10:00")
        ),
        rec(
            make_report(
                seconds={"train": 187.5},
                gates={"loss_convergence": 0.4567},
                failed=("label_mask",),
                status="failed",
                when="2026-11-02T10:00",
            )
        ),
        rec(make_report("pipeline", when="2026-11-03T10:00")),
    ]
    by_command = trends.trends(rows)
    assert set(by_command) == {"run", "pipeline"}
    run = by_command["run"]
    assert run.total_runs == 2 and [r["when"] for r in run.runs] == ["2026-11-01T10:00", "2026-11-02T10:00"]
    assert run.pass_rate == 0.5
    assert run.stage_medians["train"] == pytest.approx((101.5 + 187.5) / 2)
    assert run.gate_medians["loss_convergence"] == pytest.approx((0.2345 + 0.4567) / 2)
    text = trends.render_trends(trends.trends(rows, command="run"))
    shown = ("2026-11-01T10:00", "2026-11-02T10:00", "train 101.5", "train 187.5", "pass rate 50%")
    gate_values = ("loss_convergence 0.2345", "loss_convergence 0.4567", "label_mask 1 FAILED")
    for part in (*shown, *gate_values):
        assert part in text, part
    assert "pipeline" not in text
    assert len(trends.trends(rows * 6, last=10)["run"].runs) == 10
