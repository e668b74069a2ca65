"""The regression check: the latest run against the medians of its baseline, like compared with like."""

from __future__ import annotations

import pytest

from finetune.report import regressions
from tests.unit.report.report_builders import CONFIG, ENV, make_report
from tests.unit.report.test_history import rec


def figures(findings):
    return {f.figure for f in regressions.regressions(findings)}


def baseline_runs(n=3, command="run", **kw):
    """n healthy runs whose timings jitter by a few percent, as on a real machine."""
    jitter = [1.0, 1.04, 0.97, 1.02, 0.99]

    def seconds(i):
        return {"train": 100.0 * jitter[i % 5], "judge": 20.0 * jitter[i % 5]}

    return [rec(make_report(command, seconds=seconds(i), **kw)) for i in range(n)]


def test_an_unchanged_rerun_passes_and_names_its_baseline():
    rows = [*baseline_runs(4), *baseline_runs(1)]
    findings = regressions.check(rows)
    assert regressions.regressions(findings) == [], regressions.render_check(findings)
    assert "same environment, config and data" in findings[0].detail
    assert regressions.render_check(findings).endswith("history check: no regression")


def test_a_run_twice_as_slow_in_training_fails_naming_the_stage():
    rows = [*baseline_runs(3), rec(make_report(seconds={"train": 200.0}))]
    findings = regressions.check(rows)
    slow = next(f for f in findings if f.figure == "stage train seconds")
    assert slow.baseline == pytest.approx(100.0) and slow.latest == 200.0 and "25%" in slow.band
    assert "total seconds" in figures(findings)
    assert "stage judge seconds" not in figures(findings)
    text = regressions.render_check(findings)
    assert "[REGRESSION] stage train seconds: baseline 100, latest 200" in text and "regression(s)" in text


def test_a_tiny_stage_does_not_fail_on_noise_below_the_time_floor():
    rows = [*baseline_runs(3), rec(make_report(seconds={"estimate": 1.2}))]  # 0.5 s -> 1.2 s
    assert regressions.regressions(regressions.check(rows)) == []


def test_a_far_worse_loss_fails_naming_the_loss_figures():
    rows = [*baseline_runs(3), rec(make_report(gates={"loss_convergence": 0.6}, final_loss=1.5))]
    findings = regressions.check(rows)
    assert {"gate loss_convergence measured (final/initial loss)", "final train loss"} <= figures(findings)
    loss = next(f for f in findings if f.figure == "final train loss")
    assert (loss.baseline, loss.latest) == (0.5, 1.5)


def test_a_gate_that_flips_to_failed_fails_the_check_with_the_status():
    rows = [
        *baseline_runs(3),
        rec(make_report(status="failed", failed=("label_mask",), gates={"label_mask": 0.9})),
    ]
    findings = regressions.check(rows)
    assert {"gate label_mask", "status"} <= figures(findings)
    flip = next(f for f in findings if f.figure == "gate label_mask")
    assert (flip.baseline, flip.latest) == ("passed", "failed") and "0.9" in flip.detail


def test_a_gate_value_crossing_its_threshold_fails_even_if_the_gate_did_not_run_as_failed():
    skipped = {"status": "skipped", "measured": 0.2}  # e.g. judged skipped, yet the number is below the bar
    rows = [*baseline_runs(3), rec(make_report(gates={"memory_efficiency": skipped}))]
    assert "gate memory_efficiency measured" in figures(regressions.check(rows))


def test_parity_worse_than_the_baseline_fails_though_still_above_the_threshold():
    base = baseline_runs(3, command="pipeline")
    rows = [*base, rec(make_report("pipeline", gates={"output_parity": 0.92, "logprob_parity": 0.09}))]
    findings = regressions.check(rows)
    assert {"gate output_parity measured", "gate logprob_parity measured"} <= figures(findings)
    same = [*base, rec(make_report("pipeline", gates={"output_parity": 0.96, "logprob_parity": 0.023}))]
    assert regressions.regressions(regressions.check(same)) == []


def test_more_peak_memory_fails():
    rows = [*baseline_runs(3), rec(make_report(peak=1400 * 2**20))]
    mem = next(f for f in regressions.check(rows) if f.figure == "peak memory")
    assert (mem.baseline, mem.latest) == (700, 1400)


def test_without_an_exact_match_the_baseline_is_the_same_command_and_config_and_says_so():
    other_env = {**ENV, "packages": {**ENV["packages"], "mlx": "0.33.0"}}
    rows = [*baseline_runs(3), rec(make_report(seconds={"train": 200.0}, env=other_env))]
    findings = regressions.check(rows)
    assert "same command and config (env differ" in findings[0].detail
    assert "stage train seconds" in figures(findings)
    other_config = {**CONFIG, "lora": {"rank": 16, "scale": 20.0}}
    alone = regressions.check([*rows, rec(make_report(config=other_config))])
    assert regressions.regressions(alone) == [] and "no earlier run" in alone[0].detail


def test_fault_injected_and_interrupted_runs_are_not_a_baseline():
    fast_faulty = [rec(make_report(seconds={"train": 10.0}, faults=("nan_loss",))) for _ in range(3)]
    interrupted = rec(make_report(seconds={"train": 5.0}, status="interrupted"))
    rows = [*baseline_runs(3), *fast_faulty, interrupted, rec(make_report(seconds={"train": 104.0}))]
    assert regressions.regressions(regressions.check(rows)) == [], regressions.render_check(
        regressions.check(rows)
    )


def test_too_few_runs_compare_gates_but_not_times():
    rows = [
        *baseline_runs(1),
        rec(make_report(seconds={"train": 300.0}, status="failed", failed=("artifacts",))),
    ]
    findings = regressions.check(rows)
    assert figures(findings) == {"gate artifacts", "status"}
    assert any(f.figure == "times" and f.severity == "note" for f in findings)


def test_check_of_one_tier_compares_that_tiers_latest_run():
    rows = [
        *baseline_runs(3),
        rec(make_report(seconds={"train": 250.0})),
        *baseline_runs(4, command="pipeline"),
    ]
    assert (
        regressions.regressions(regressions.check(rows)) == []
    )  # the latest run overall is a steady pipeline run
    assert "stage train seconds" in figures(regressions.check(rows, command="run"))


def test_cached_stages_are_not_timed():
    cached = [rec(make_report(cached=("model", "data", "train"))) for _ in range(3)]
    assert cached[0]["stages"]["train"] == {"status": "passed", "seconds": 0.0, "cached": True}
    rows = [*baseline_runs(3), *cached[:2], rec(make_report(seconds={"train": 200.0}))]
    slow = next(f for f in regressions.check(rows) if f.figure == "stage train seconds")
    assert slow.baseline == pytest.approx(100.0)  # the 0 s of cached runs are not in the median
    assert regressions.regressions(regressions.check([*baseline_runs(3), cached[2]])) == []
