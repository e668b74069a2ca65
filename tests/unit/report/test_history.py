"""Run history: records made from reports, a log that survives a torn line, trends, and the regression check."""

from __future__ import annotations

import json
import subprocess

import pytest

from finetune.report import history
from tests.unit.report.report_builders import CONFIG, ENV, make_report


def rec(report, commit="c" * 40):
    return history.record_from_report(report, commit=commit)


def figures(findings):
    return {f.figure for f in history.regressions(findings)}


def baseline_runs(n=3, tier="run", **kw):
    """n healthy runs whose timings jitter by a few percent, as on a real machine."""
    jitter = [1.0, 1.04, 0.97, 1.02, 0.99]
    return [rec(make_report(tier, seconds={"train": 100.0 * jitter[i % 5], "judge": 20.0 * jitter[i % 5]}, **kw))
            for i in range(n)]  # fmt: skip


# ---------------------------------------------------------------- records and the file


def test_append_and_load_survive_a_torn_last_line(tmp_path):
    path = tmp_path / "deep" / "history.jsonl"
    first, second = rec(make_report(when="t1")), rec(make_report(when="t2"))
    history.append(first, path)
    history.append(second, path)
    with open(path, "a") as fh:  # a crash in the middle of a write
        fh.write('{"tier": "run", "status": "pas')
    assert [r["when"] for r in history.load(path)] == ["t1", "t2"]
    history.append(rec(make_report(when="t3")), path)
    rows = history.load(path)
    assert [r["when"] for r in rows] == ["t1", "t2", "t3"], "the torn line must not swallow the next record"
    assert rows[0] == json.loads(json.dumps(first))
    assert path.read_text().count("\n") == 4  # the torn fragment stays on a line of its own


def test_load_of_a_missing_file_is_an_empty_history(tmp_path):
    assert history.load(tmp_path / "none.jsonl") == []
    assert history.check([]) and not history.regressions(history.check([]))


def test_history_path_defaults_under_output_dir_and_ft_history_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv("FT_HISTORY", raising=False)
    assert history.history_path("artifacts") == history.Path("artifacts/history.jsonl")
    monkeypatch.setenv("FT_HISTORY", str(tmp_path / "h.jsonl"))
    assert history.history_path("artifacts") == tmp_path / "h.jsonl"


def test_a_record_carries_times_memory_gates_and_digests():
    r = rec(make_report(seconds={"train": 123.0}, peak=812 * 2**20, final_loss=0.42, data_sha="a" * 64))
    assert r["tier"] == "run" and r["status"] == "passed" and r["exit_code"] == 0
    assert r["stages"]["train"] == {"status": "passed", "seconds": 123.0, "cached": False}
    assert r["seconds"] == pytest.approx(2 + 5 + 0.5 + 123 + 20)
    assert r["peak_memory_bytes"] == 812 * 2**20
    assert r["final_train_loss"] == 0.42
    assert r["gates"]["loss_convergence"] == {"status": "passed", "measured": 0.2, "threshold": 0.95}
    assert r["data_digest"] == "a" * 64 and r["commit"] == "c" * 40 and r["code_version"] == "0.2.0+abc"
    assert len(r["env_digest"]) == len(r["config_digest"]) == 64


def test_digests_ignore_output_paths_and_free_memory_but_not_what_the_run_is():
    base = rec(make_report())
    moved = rec(
        make_report(
            config={**CONFIG, "output_dir": "/elsewhere"}, env={**ENV, "memory": {"available_bytes": 1}}
        )
    )
    assert moved["config_digest"] == base["config_digest"] and moved["env_digest"] == base["env_digest"]
    lr = rec(make_report(config={**CONFIG, "training": {**CONFIG["training"], "learning_rate": 1e-3}}))
    assert lr["config_digest"] != base["config_digest"]
    other_blas = rec(
        make_report(env={**ENV, "blas": {**ENV["blas"], "active": "reference", "library": "/x.so"}})
    )
    assert other_blas["env_digest"] != base["env_digest"]
    assert rec(make_report(data_sha="e" * 64))["data_digest"] != base["data_digest"]


def test_final_loss_comes_from_metrics_when_no_gate_judged_it(tmp_path):
    rows = [{"kind": "train", "step": s, "train_loss": 3.0 - 0.1 * s} for s in range(1, 21)]
    rows.append({"kind": "val", "step": 20, "val_loss": 1.5})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = rec(make_report("train", status="not_judged", run_dir=str(tmp_path)))
    assert r["gates"] == {}
    assert r["final_train_loss"] == pytest.approx(3.0 - 0.1 * 18)  # mean of the last 5 steps (16..20)


def test_git_commit_is_head_inside_a_repo_and_none_outside(tmp_path):
    assert history.git_commit(tmp_path) is None
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run(
        [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert history.git_commit(tmp_path) == head


# ---------------------------------------------------------------- trends


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
        ),  # fmt: skip
        rec(make_report("pipeline", when="2026-11-03T10:00")),
    ]
    by_tier = history.trends(rows)
    assert set(by_tier) == {"run", "pipeline"}
    run = by_tier["run"]
    assert run.total_runs == 2 and [r["when"] for r in run.runs] == ["2026-11-01T10:00", "2026-11-02T10:00"]
    assert run.pass_rate == 0.5
    assert run.stage_medians["train"] == pytest.approx((101.5 + 187.5) / 2)
    assert run.gate_medians["loss_convergence"] == pytest.approx((0.2345 + 0.4567) / 2)
    text = history.render_trends(history.trends(rows, tier="run"))
    for shown in ("2026-11-01T10:00", "2026-11-02T10:00", "train 101.5", "train 187.5",
                  "loss_convergence 0.2345", "loss_convergence 0.4567", "label_mask 1 FAILED", "pass rate 50%"):  # fmt: skip
        assert shown in text, shown
    assert "pipeline" not in text
    assert len(history.trends(rows * 6, last=10)["run"].runs) == 10


# ---------------------------------------------------------------- check


def test_an_unchanged_rerun_passes_and_names_its_baseline():
    rows = [*baseline_runs(4), *baseline_runs(1)]
    findings = history.check(rows)
    assert history.regressions(findings) == [], history.render_check(findings)
    assert "same environment, config and data" in findings[0].detail
    assert history.render_check(findings).endswith("history check: no regression")


def test_a_run_twice_as_slow_in_training_fails_naming_the_stage():
    rows = [*baseline_runs(3), rec(make_report(seconds={"train": 200.0}))]
    findings = history.check(rows)
    slow = next(f for f in findings if f.figure == "stage train seconds")
    assert slow.baseline == pytest.approx(100.0) and slow.latest == 200.0 and "25%" in slow.band
    assert "total seconds" in figures(findings)
    assert "stage judge seconds" not in figures(findings)
    text = history.render_check(findings)
    assert "[REGRESSION] stage train seconds: baseline 100, latest 200" in text and "regression(s)" in text


def test_a_tiny_stage_does_not_fail_on_noise_below_the_time_floor():
    rows = [*baseline_runs(3), rec(make_report(seconds={"estimate": 1.2}))]  # 0.5 s -> 1.2 s
    assert history.regressions(history.check(rows)) == []


def test_a_far_worse_loss_fails_naming_the_loss_figures():
    rows = [*baseline_runs(3), rec(make_report(gates={"loss_convergence": 0.6}, final_loss=1.5))]
    findings = history.check(rows)
    assert {"gate loss_convergence measured (final/initial loss)", "final train loss"} <= figures(findings)
    loss = next(f for f in findings if f.figure == "final train loss")
    assert (loss.baseline, loss.latest) == (0.5, 1.5)


def test_a_gate_that_flips_to_failed_fails_the_check_with_the_status():
    rows = [
        *baseline_runs(3),
        rec(make_report(status="failed", failed=("label_mask",), gates={"label_mask": 0.9})),
    ]
    findings = history.check(rows)
    assert {"gate label_mask", "status"} <= figures(findings)
    flip = next(f for f in findings if f.figure == "gate label_mask")
    assert (flip.baseline, flip.latest) == ("passed", "failed") and "0.9" in flip.detail


def test_a_gate_value_crossing_its_threshold_fails_even_if_the_gate_did_not_run_as_failed():
    skipped = {"status": "skipped", "measured": 0.2}  # e.g. judged skipped, yet the number is below the bar
    rows = [*baseline_runs(3), rec(make_report(gates={"memory_efficiency": skipped}))]
    assert "gate memory_efficiency measured" in figures(history.check(rows))


def test_parity_worse_than_the_baseline_fails_though_still_above_the_threshold():
    base = baseline_runs(3, tier="pipeline")
    rows = [*base, rec(make_report("pipeline", gates={"output_parity": 0.92, "logprob_parity": 0.09}))]
    findings = history.check(rows)
    assert {"gate output_parity measured", "gate logprob_parity measured"} <= figures(findings)
    same = [*base, rec(make_report("pipeline", gates={"output_parity": 0.96, "logprob_parity": 0.023}))]
    assert history.regressions(history.check(same)) == []


def test_more_peak_memory_fails():
    rows = [*baseline_runs(3), rec(make_report(peak=1400 * 2**20))]
    mem = next(f for f in history.check(rows) if f.figure == "peak memory")
    assert (mem.baseline, mem.latest) == (700, 1400)


def test_without_an_exact_match_the_baseline_is_the_same_tier_and_config_and_says_so():
    other_env = {**ENV, "packages": {**ENV["packages"], "mlx": "0.33.0"}}
    rows = [*baseline_runs(3), rec(make_report(seconds={"train": 200.0}, env=other_env))]
    findings = history.check(rows)
    assert "same tier and config (env differ" in findings[0].detail
    assert "stage train seconds" in figures(findings)
    other_config = {**CONFIG, "lora": {"rank": 16, "scale": 20.0}}
    alone = history.check([*rows, rec(make_report(config=other_config))])
    assert history.regressions(alone) == [] and "no earlier run" in alone[0].detail


def test_fault_injected_and_interrupted_runs_are_not_a_baseline():
    fast_faulty = [rec(make_report(seconds={"train": 10.0}, faults=("nan_loss",))) for _ in range(3)]
    interrupted = rec(make_report(seconds={"train": 5.0}, status="interrupted"))
    rows = [*baseline_runs(3), *fast_faulty, interrupted, rec(make_report(seconds={"train": 104.0}))]
    assert history.regressions(history.check(rows)) == [], history.render_check(history.check(rows))


def test_too_few_runs_compare_gates_but_not_times():
    rows = [
        *baseline_runs(1),
        rec(make_report(seconds={"train": 300.0}, status="failed", failed=("artifacts",))),
    ]
    findings = history.check(rows)
    assert figures(findings) == {"gate artifacts", "status"}
    assert any(f.figure == "times" and f.severity == "note" for f in findings)


def test_check_of_one_tier_compares_that_tiers_latest_run():
    rows = [*baseline_runs(3), rec(make_report(seconds={"train": 250.0})), *baseline_runs(4, tier="pipeline")]
    assert history.regressions(history.check(rows)) == []  # the latest run overall is a steady pipeline run
    assert "stage train seconds" in figures(history.check(rows, tier="run"))


def test_cached_stages_are_not_timed():
    cached = [rec(make_report(cached=("model", "data", "train"))) for _ in range(3)]
    assert cached[0]["stages"]["train"] == {"status": "passed", "seconds": 0.0, "cached": True}
    rows = [*baseline_runs(3), *cached[:2], rec(make_report(seconds={"train": 200.0}))]
    slow = next(f for f in history.check(rows) if f.figure == "stage train seconds")
    assert slow.baseline == pytest.approx(100.0)  # the 0 s of cached runs are not in the median
    assert history.regressions(history.check([*baseline_runs(3), cached[2]])) == []
