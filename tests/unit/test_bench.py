"""Pure parts of bench/: statistics, goals, parsers, section summaries and the markdown/JSON report.

No timing assertions: performance claims live in docs/benchmarks.md, not in tests.
"""

from __future__ import annotations

import json

import pytest

from bench import blas_bench, inference, memory_bench, report, tiers, training
from bench.stats import Figure, Goal, Section, fmt, intervals, median, ratio, spread, steady

# ---------------------------------------------------------------- stats


def test_median_ratio_spread_ignore_missing_values():
    assert median([3.0, 1.0, 2.0, float("nan")]) == 2.0
    assert median([]) is None
    assert ratio(3.0, 2.0) == 1.5
    assert ratio(1.0, 0.0) is None and ratio(None, 1.0) is None
    assert spread([2.0, 5.0, 1.0]) == (1.0, 5.0)


def test_intervals_and_steady_drop_warmup_and_tail():
    assert intervals([0.0, 1.0, 3.0, 6.0]) == [1.0, 2.0, 3.0]
    assert steady([1, 2, 3, 4, 5], warmup=2, drop_last=1) == [3, 4]
    assert steady([1, 2], warmup=2, drop_last=1) == []


@pytest.mark.parametrize(
    ("op", "value", "expected"),
    [(">=", 0.98, True), (">=", 0.97, False), ("<=", 30.0, True), ("<=", 30.5, False),
     ("abs<=", -14.9, True), ("abs<=", -15.1, False), (">=", None, None)],
)  # fmt: skip
def test_goal_met(op, value, expected):
    target = {">=": 0.98, "<=": 30.0, "abs<=": 15.0}[op]
    assert Goal(op, target).met(value) is expected


def test_goal_rejects_unknown_operator():
    with pytest.raises(ValueError, match="goal op"):
        Goal(">", 1.0)


def test_figure_to_dict_carries_goal_text_and_verdict():
    d = Figure("k", "label", 0.5, "×", Goal(">=", 1.5)).to_dict()
    assert d["met"] is False and d["goal"]["text"] == "≥ 1.5"
    assert Figure("k", "label", None).to_dict()["met"] is None


def test_fmt_shows_ratios_with_three_decimals():
    assert fmt(0.9789, "×") == "0.979 ×"
    assert fmt(-11.34, "%") == "-11.3 %"
    assert fmt(12345.6, "tokens/s") == "12,346 tokens/s"
    assert fmt(None) == "—"


# ---------------------------------------------------------------- training


def test_parse_mlx_lm_line_reads_report_lines_with_colours():
    coloured = "  \x1b[38;5;244m   3\x1b[0m    \x1b[1;32m10.589 ▼\x1b[0m    \x1b[1m  1,159\x1b[0m    \x1b[38;5;244m  0.6k\x1b[0m\n"
    assert training.parse_mlx_lm_line(coloured) == (3, 10.589, 1159.0)
    assert training.parse_mlx_lm_line("    12    2.500 ▲      98    3.1k") == (12, 2.5, 98.0)


def test_parse_mlx_lm_line_ignores_validation_and_other_lines():
    assert training.parse_mlx_lm_line("     1    val 10.783    0.54s") is None
    assert training.parse_mlx_lm_line("Trainable parameters: 0.689% (0.023M/3.269M)") is None


def test_read_metrics_times_keeps_train_rows_in_step_order(tmp_path):
    rows = [{"kind": "val", "step": 0, "val_loss": 3.0}, {"kind": "train", "step": 2, "time": 20.0, "tokens_per_second": 5},
            {"kind": "train", "step": 1, "time": 10.0, "tokens_per_second": 4}]  # fmt: skip
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert training.read_metrics_times(path) == ([10.0, 20.0], [4, 5])


def test_run_step_seconds_skips_warmup_and_last_step():
    run = training.Run("finetune", 0, times=[0.0, 5.0, 6.0, 7.5, 9.0, 20.0])  # steps 1..6
    # durations of steps 2..6 = [5, 1, 1.5, 1.5, 11]; warm-up 2 drops step 2, the last (eval) is dropped
    assert run.step_seconds(warmup=2) == [1.0, 1.5, 1.5]


def test_batch_widths_pad_like_mlx_lm():
    assert training.batch_widths([40, 50, 60, 63], 2, 256) == {65}
    assert training.batch_widths([40, 50, 60, 64], 2, 256, extra=1) == {65, 97}
    assert training.batch_widths([300, 300], 2, 256) == {256}


def _settings(**kw):
    base = dict(model="m", model_path="/m", profile="quick", overrides=[], batch_size=4, max_seq_length=256, rank=8,
                scale=20.0, dropout=0.0, num_layers=8, keys=None, learning_rate=2e-4, seed=0, iters=6, warmup=2,
                rounds=1)  # fmt: skip
    return training.Settings(**{**base, **kw})


DATA = {"source": "builtin:mixed", "examples": 96, "min_length": 40, "max_length": 60, "mean_length": 50.0,
        "widths": [65], "widths_mlx_lm": [65], "train_sha256": "x"}  # fmt: skip


def _run(tool, step_s, rnd=0):
    return training.Run(tool, rnd, times=[i * step_s for i in range(6)])


def test_training_summary_ratios_and_goals():
    s = training.summarize(
        _settings(), [_run("finetune", 1.0), _run("mlx_lm", 0.99), _run("peft", 2.0)], DATA
    )
    figs = {f.key: f for f in s.figures}
    assert figs["training.finetune_tokens_per_s"].value == pytest.approx(200.0)
    assert (
        figs["training.finetune_over_mlx_lm"].value == pytest.approx(0.99)
        and figs["training.finetune_over_mlx_lm"].met
    )
    assert (
        figs["training.finetune_over_peft"].value == pytest.approx(2.0)
        and figs["training.finetune_over_peft"].met
    )


def test_training_summary_fails_goals_when_finetune_is_slower():
    s = training.summarize(_settings(), [_run("finetune", 1.2), _run("mlx_lm", 1.0), _run("peft", 1.0)], DATA)
    figs = {f.key: f for f in s.figures}
    assert figs["training.finetune_over_mlx_lm"].met is False
    assert figs["training.finetune_over_peft"].met is False


def test_training_summary_reports_failed_runs():
    bad = training.Run("peft", 0, error="exit 1: boom")
    s = training.summarize(_settings(), [_run("finetune", 1.0), _run("mlx_lm", 1.0), bad], DATA)
    figs = {f.key: f for f in s.figures}
    assert figs["training.peft_tokens_per_s"].value is None
    assert figs["training.finetune_over_peft"].met is None
    assert any("boom" in n for n in s.notes)


def test_mlx_lm_config_mirrors_settings(tmp_path):
    cfg = training.mlx_lm_config(_settings(keys=["self_attn.q_proj"]), tmp_path / "data", tmp_path / "a")
    assert cfg["num_layers"] == 8 and cfg["batch_size"] == 4 and cfg["mask_prompt"] is False
    assert cfg["lora_parameters"] == {"rank": 8, "scale": 20.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]}
    assert cfg["steps_per_report"] == 1 and cfg["steps_per_eval"] > cfg["iters"]


# ---------------------------------------------------------------- other sections


def _probe(peak):
    return {"peak_bytes": peak, "batch_shape": [4, 65], "trainable_params": 10}


def test_memory_summary_passes_within_and_fails_outside_15_percent():
    rows = {
        "lora": {"measured": _probe(1000), "predicted_bytes": 1100, "error_pct": 10.0, "predicted_params": 10,
                 "breakdown": {"weights": 1100}},
        "full": {"measured": _probe(4000), "predicted_bytes": 3000, "error_pct": -25.0, "predicted_params": 10,
                 "breakdown": {"weights": 3000}},
    }  # fmt: skip
    figs = {f.key: f for f in memory_bench.summarize("m", rows).figures}
    assert figs["memory.lora_error_pct"].met is True
    assert (
        figs["memory.full_error_pct"].met is False and "undershoots" in figs["memory.full_error_pct"].reason
    )
    assert figs["memory.lora_saving"].value == pytest.approx(75.0)


def test_blas_summary_flags_reference_blas():
    slow = {"n": 8, "mlx_gflops": [2.0], "numpy_gflops": [50.0], "ratios": [0.04], "active_blas": "reference",
            "library": None, "openblas_threads": "1"}  # fmt: skip
    fig = {f.key: f for f in blas_bench.summarize(slow, None).figures}["blas.mlx_over_numpy"]
    assert fig.met is False and "reference" in fig.reason
    fast = {**slow, "mlx_gflops": [40.0], "ratios": [0.8], "active_blas": "openblas"}
    figs = {f.key: f for f in blas_bench.summarize(fast, slow).figures}
    assert figs["blas.mlx_over_numpy"].met and figs["blas.speedup"].value == pytest.approx(20.0)


def test_pytest_summary_reads_the_closing_line():
    out = "....F\n=========== 1 failed, 4 passed, 2 skipped in 3.21s ===========\n"
    assert tiers.pytest_summary(out) == "1 failed, 4 passed, 2 skipped"
    assert tiers.pytest_summary("13 passed in 2.49s") == "13 passed"
    assert tiers.pytest_summary("no summary") == ""


def test_tiers_summary_budgets_failures_and_recorded_reports():
    live = {"tier1": {"seconds": 3.0, "exit_code": 0, "summary": "13 passed"},
            "make_test": {"seconds": 400.0, "exit_code": 1, "summary": "1 failed"}}  # fmt: skip
    recorded = {"tier2": {"seconds": 421.0, "status": "passed", "model": "smollm2", "recorded": "2026-11-25", "source": "x"},
                "tier3": {"seconds": 12.0, "status": "failed", "model": "tiny-llama", "recorded": "2026-11-25", "source": "y"}}  # fmt: skip
    figs = {f.key: f for f in tiers.summarize(live, recorded).figures}
    assert figs["tiers.tier1_s"].met is True
    assert figs["tiers.make_test_s"].met is False and "did not all pass" in figs["tiers.make_test_s"].reason
    assert figs["tiers.tier2_s"].met is False and figs["tiers.tier2_s"].recorded == "2026-11-25"
    assert figs["tiers.tier3_s"].value is None and "did not pass" in figs["tiers.tier3_s"].reason


def test_recorded_tier3_prefers_a_passed_real_model_run(tmp_path):
    for name, status, model, when in (
        ("a", "failed", "tiny-llama", "2026-11-26"),
        ("b", "passed", "smollm2-135m", "2026-11-20"),
    ):
        (tmp_path / name).mkdir()
        (tmp_path / name / "report.json").write_text(json.dumps({"seconds": 1.0, "status": status, "model": model,
                                                                 "finished_at": when}))  # fmt: skip
    assert tiers.recorded_tier3(tmp_path)["source"].endswith("b/report.json")
    assert tiers.recorded_tier3(tmp_path / "none") is None


def test_inference_summary_reports_skipped_engines():
    runs = {
        "runs": [
            {"tps": 10.0, "tokens": 64, "prompt_tps": 100.0},
            {"tps": 12.0, "tokens": 64, "prompt_tps": 90.0},
        ]
    }
    s = inference.summarize("m", {"mlx": runs, "llamacpp": {"runs": [{"tps": 44.0, "tokens": 64, "prompt_tps": 80.0}]},
                                  "ollama": {"skipped": "no ollama on PATH"}}, 64)  # fmt: skip
    figs = {f.key: f for f in s.figures}
    assert figs["inference.mlx_tokens_per_s"].value == pytest.approx(11.0)
    assert figs["inference.mlx_over_llamacpp"].value == pytest.approx(0.25)
    assert (
        figs["inference.ollama_tokens_per_s"].value is None and figs["inference.ollama_tokens_per_s"].reason
    )


# ---------------------------------------------------------------- report


META = {"date": "2026-11-25T00:00:00+00:00", "mode": "full", "seconds": 600, "commit": "abc123",
        "machine": {"cpu_model": "Test CPU", "cpu_count": 2, "memory_total_bytes": 24 * 1024**3, "platform": "Linux",
                    "python": "3.11", "loadavg_start": "1.0", "loadavg_end": "2.0", "env": {"OPENBLAS_NUM_THREADS": "1"}},
        "versions": {"mlx": "0.32.4", "torch": None}}  # fmt: skip


def _sections():
    a = Section("a", "Alpha", seconds=2.0)
    a.add(Figure("a.ok", "ratio ok", 1.0, "×", Goal(">=", 0.98)))
    a.add(Figure("a.bad", "ratio | bad", 0.5, "×", Goal(">=", 1.5), reason="measured: threads"))
    a.add(Figure("a.none", "missing", None, "s", Goal("<=", 30), reason="not run"))
    a.table(["x", "y"], [[1, "a|b"]])
    a.notes.append("a note")
    return [a, Section("b", "Beta", error="RuntimeError: boom")]


def test_render_markdown_shows_every_figure_with_goal_and_status():
    md = report.render_markdown(META, _sections())
    assert md.startswith(report.HEADER)
    assert "Test CPU, 2 logical cores" in md and "24.0 GiB" in md and "mlx 0.32.4" in md and "torch" not in md
    assert "| ratio ok | 1.000 × | ≥ 0.98 | met |" in md
    assert "| ratio \\| bad | 0.500 × | ≥ 1.5 | NOT met |" in md
    assert "| missing | — | ≤ 30 | not measured |" in md
    assert "**Why:** measured: threads" in md
    assert "**Section failed:** RuntimeError: boom" in md
    assert "| 1 | a\\|b |" in md and "- a note" in md


def test_write_produces_markdown_and_json(tmp_path):
    md, js = report.write(tmp_path / "docs", META, _sections())
    data = json.loads(js.read_text())
    assert data["machine"]["cpu_model"] == "Test CPU" and data["date"] == META["date"]
    assert [f["met"] for f in data["sections"][0]["figures"]] == [True, False, None]
    assert data["sections"][1]["error"] == "RuntimeError: boom"
    assert md.read_text() == report.render_markdown(META, _sections())


def test_bench_self_timing_judges_the_15_minute_budget():
    from bench.run import self_timing

    assert self_timing(600.0, quick=False).figures[0].met is True
    assert self_timing(901.0, quick=False).figures[0].met is False


def test_step_gflop_counts_forward_everywhere_and_backward_through_adapted_blocks():
    cfg = {"hidden_size": 4, "intermediate_size": 8, "num_attention_heads": 2, "num_key_value_heads": 1,
           "vocab_size": 10, "num_hidden_layers": 3}  # fmt: skip
    block = 2 * 4 * 4 + 2 * 4 * 2 + 3 * 4 * 8  # q,o + k,v + gate,up,down
    tokens = 2 * 4  # batch 2, width 5 feeds 4 positions
    expected = 2 * tokens * (3 * block + 40) + 2 * tokens * (1 * block + 40)
    assert training.step_gflop(cfg, 2, 5, 1) == pytest.approx(expected / 1e9)


def test_training_summary_explains_the_matmul_floor():
    data = {**DATA, "step_gflop": 100.0, "matmul_gflops": 50.0, "vocab_size": 49152}
    s = training.summarize(_settings(), [_run("finetune", 4.0), _run("mlx_lm", 4.0), _run("peft", 3.0)], data)
    floor = next(n for n in s.notes if n.startswith("Matmul floor"))
    assert "2.00 s, 50% of FineTune's median step (4.00 s)" in floor
    assert any("≤ 2.00 s per step" in n for n in s.notes)
