"""Pure parts of bench/ and the training rounds with fake tools: statistics, goals, parsers, section summaries
and the markdown/JSON report.

No timing assertions: performance claims live in docs/benchmarks.md, not in tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench import (
    blas_bench,
    inference,
    memory_bench,
    report,
    tiers,
    training,
    training_runs,
    training_summary,
    training_tools,
)
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


GOAL_CASES = [
    (">=", 0.98, True),
    (">=", 0.97, False),
    ("<=", 30.0, True),
    ("<=", 30.5, False),
    ("abs<=", -14.9, True),
    ("abs<=", -15.1, False),
    (">=", None, None),
]


@pytest.mark.parametrize(("op", "value", "expected"), GOAL_CASES)
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


# ---------------------------------------------------------------- training: parsing


def test_parse_mlx_lm_line_reads_report_lines_with_colours():
    coloured = "  \x1b[38;5;244m   3\x1b[0m    \x1b[1;32m10.589 ▼\x1b[0m    \x1b[1m  1,159\x1b[0m    \x1b[38;5;244m  0.6k\x1b[0m\n"
    assert training_runs.parse_mlx_lm_line(coloured) == (3, 10.589, 1159.0)
    assert training_runs.parse_mlx_lm_line("    12    2.500 ▲      98    3.1k") == (12, 2.5, 98.0)


def test_parse_mlx_lm_line_ignores_validation_and_other_lines():
    assert training_runs.parse_mlx_lm_line("     1    val 10.783    0.54s") is None
    assert training_runs.parse_mlx_lm_line("Trainable parameters: 0.689% (0.023M/3.269M)") is None


def test_parse_mlx_lm_val_reads_validation_seconds():
    coloured = "  \x1b[38;5;244m   1\x1b[0m    \x1b[1;35mval\x1b[0m \x1b[1m44.470\x1b[0m    \x1b[38;5;244m0.32s\x1b[0m\n"
    assert training_runs.parse_mlx_lm_val(coloured) == pytest.approx(0.32)
    assert training_runs.parse_mlx_lm_val("    12    2.500 ▲      98    3.1k") is None


def test_parse_marker_reads_the_child_lines():
    assert training_runs.parse_marker(
        "BENCH_LOOP_START 1795920272.560751\n", training_runs.LOOP_START
    ) == pytest.approx(1795920272.560751)
    assert (
        training_runs.parse_marker("BENCH_PEAK_MEMORY_BYTES 218706652", training_runs.PEAK_LINE) == 218706652
    )
    assert training_runs.parse_marker("BENCH_PEAK_MEMORY_BYTES", training_runs.PEAK_LINE) is None
    assert training_runs.parse_marker("Loading datasets", training_runs.LOOP_START) is None


def test_read_metrics_keeps_train_rows_in_step_order_and_val_times(tmp_path):
    rows = [
        {"kind": "val", "step": 0, "val_loss": 3.0, "val_time": 0.5},
        {"kind": "train", "step": 2, "time": 20.0, "tokens_per_second": 5, "train_loss": 2.0},
        {"kind": "train", "step": 1, "time": 10.0, "tokens_per_second": 4, "train_loss": 2.5},
        {"kind": "val", "step": 2, "val_loss": 2.9, "val_time": 0.25},
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert training_runs.read_metrics_times(path) == ([10.0, 20.0], [4, 5])
    m = training_runs.read_metrics(path)
    assert m["losses"] == [2.5, 2.0] and m["val_times"] == [0.5, 0.25]


def test_prefix_seconds_from_the_shortcuts_note():
    note = "exact training shortcuts: cached frozen prefix\n  - prefix computed once in 27.2 s (5.3 MiB)"
    assert training_runs.prefix_seconds(note) == pytest.approx(27.2)
    assert training_runs.prefix_seconds("exact training shortcuts: none (plain mlx-lm path)") == 0.0
    assert training_runs.prefix_seconds(None) == 0.0


def test_max_relative_difference_over_shared_steps():
    assert training_runs.max_relative_difference([2.0, 1.0001], [2.0, 1.0, 5.0]) == pytest.approx(1e-4)
    assert training_runs.max_relative_difference([], [1.0]) is None


def test_run_step_seconds_skips_warmup_and_last_step():
    run = training_runs.Run("finetune", 0, times=[0.0, 5.0, 6.0, 7.5, 9.0, 20.0])  # steps 1..6
    # durations of steps 2..6 = [5, 1, 1.5, 1.5, 11]; warm-up 2 drops step 2, the last (eval) is dropped
    assert run.step_seconds(warmup=2) == [1.0, 1.5, 1.5]


def test_run_end_to_end_counts_every_step_and_the_one_off_cost():
    run = training_runs.Run("finetune", 0, times=[1.0, 2.0, 3.0, 4.0], loop_s=6.0, one_off_s=2.0)
    assert run.end_to_end_tps(100.0) == pytest.approx(4 * 100 / 8.0)
    assert training_runs.Run("mlx_lm", 0, times=[1.0], loop_s=None).end_to_end_tps(100.0) is None
    assert training_runs.Run("peft", 0, times=[1.0], loop_s=1.0, error="boom").end_to_end_tps(100.0) is None


def test_batch_widths_pad_like_mlx_lm():
    assert training_runs.batch_widths([40, 50, 60, 63], 2, 256) == {65}
    assert training_runs.batch_widths([40, 50, 60, 64], 2, 256, extra=1) == {65, 97}
    assert training_runs.batch_widths([300, 300], 2, 256) == {256}


def test_completion_row_cuts_at_the_answer_span():
    text = "<|im_start|>user\nHi?<|im_end|>\n<|im_start|>assistant\nHello.<|im_end|>\n"
    start = text.index("Hello")
    row = {"text": text, "train_spans": [[start, text.rindex("\n")]]}
    out = training_runs.completion_row(row)
    assert out["prompt"] + out["completion"] == text and out["completion"].startswith("Hello.")
    assert training_runs.completion_row({"text": "abc", "train_spans": []}) == {
        "prompt": "abc",
        "completion": "",
    }


def test_mlx_lm_loss_positions_include_one_past_the_end():
    # ids of length 10, prompt of 6: targets at positions 6..10 (position 10 is the first pad)
    assert training_runs.mlx_lm_loss_positions(10, 6, 256) == 5
    assert training_runs.mlx_lm_loss_positions(10, 0, 256) == 10  # no mask: positions 1..10
    assert training_runs.mlx_lm_loss_positions(300, 0, 256) == 255  # truncated: the batch ends at 255


def test_loss_token_check_counts_targets_and_matching_prompts():
    ft = [([1, 2, 3, 4, 5], [0, 0, 0, 1, 1]), ([1, 2, 3], [0, 1, 1])]
    mlx = [([1, 2, 3, 4, 5], 3), ([1, 2, 3, 9], 2)]
    c = training_runs.loss_token_check(ft, mlx, 256)
    assert c["finetune_loss_tokens"] == 4 and c["mlx_lm_loss_tokens"] == 3 + 3
    assert c["same_ids"] == 1 and c["same_ids_prefix"] == 2
    assert c["same_prompt_mask"] == 1  # row 2: FineTune trains from position 1, mlx-lm from 2


def test_epoch_steps_and_rotation():
    assert training_runs.epoch_steps(80, 4) == 20 and training_runs.epoch_steps(3, 4) == 1
    assert training_runs.rotated(("a", "b", "c", "d"), 1) == ("b", "c", "d", "a")
    assert training_runs.rotated(("a", "b", "c", "d"), 4) == ("a", "b", "c", "d")


def test_round_ratios_pair_runs_of_the_same_round():
    values = {("finetune", 0): 300.0, ("peft", 0): 100.0, ("finetune", 1): 200.0, ("mlx_lm", 1): 100.0}
    assert training_runs.round_ratios(values, "finetune", "peft") == [3.0]
    assert training_runs.round_ratios(values, "finetune", "mlx_lm") == [2.0]


# ---------------------------------------------------------------- training: summary


SETTINGS = {
    "model": "m",
    "model_path": "/m",
    "profile": "quick",
    "overrides": [],
    "batch_size": 4,
    "max_seq_length": 256,
    "rank": 8,
    "scale": 20.0,
    "dropout": 0.0,
    "num_layers": 8,
    "keys": None,
    "learning_rate": 2e-4,
    "seed": 0,
    "iters": 6,
    "warmup": 2,
    "rounds": 1,
}


def _settings(key="equal", **kw):
    return training_runs.Settings(**{**SETTINGS, "key": key, "mask_prompt": key == "release", **kw})


DATA = {
    "source": "builtin:mixed",
    "examples": 96,
    "min_length": 40,
    "max_length": 60,
    "mean_length": 50.0,
    "widths": [65],
    "widths_mlx_lm": [65],
    "train_sha256": "x",
    "epoch_steps": 24,
}
LOSSES = [3.0, 2.5, 2.0, 1.8, 1.5, 1.2]
MIB = 2**20


def _run(tool, step_s, rnd=0, setting="equal", one_off=0.0, losses=None):
    times = [i * step_s for i in range(1, 7)]
    losses = LOSSES if losses is None else losses
    memory = {"peak_bytes": 100 * MIB, "rss_bytes": 500 * MIB}
    return training_runs.Run(
        tool, rnd, setting, times=times, loop_s=6 * step_s, one_off_s=one_off, losses=losses, **memory
    )


def _summary(equal_runs, release_runs=(), release_settings=None):
    settings = [_settings()] + (
        [release_settings or _settings("release", profile="release")] if release_runs else []
    )
    data = {"equal": DATA, "release": DATA}
    return training_summary.summarize(settings, [*equal_runs, *release_runs], data)


def _figs(s):
    return {f.key: f for f in s.figures}


def test_equal_summary_ratios_and_goals():
    s = _summary([_run("finetune", 1.0), _run("finetune_off", 1.5), _run("mlx_lm", 0.99), _run("peft", 2.0)])
    figs = _figs(s)
    assert figs["training.equal.finetune_tokens_per_s"].value == pytest.approx(200.0)
    assert figs["training.equal.finetune_over_mlx_lm"].value == pytest.approx(0.99)
    assert figs["training.equal.finetune_over_mlx_lm"].goal is None
    peft = figs["training.equal.finetune_over_peft"]
    assert peft.value == pytest.approx(2.0) and peft.met and peft.goal.target == 1.0
    assert figs["training.equal.shortcuts_on_over_off"].value == pytest.approx(1.5)
    assert figs["training.equal.loss_on_vs_off"].value == 0.0 and figs["training.equal.loss_on_vs_off"].met
    table = s.tables[0]
    assert table["headers"][5] == "end-to-end tokens/s" and [r[0] for r in table["rows"]] == [
        training_runs.LABELS[t] for t in training_runs.TOOLS
    ]
    assert table["rows"][0][8] == "100" and table["rows"][0][9] == "500"  # MiB


def test_equal_summary_fails_the_peft_goal_when_finetune_is_slower():
    figs = _figs(
        _summary([_run("finetune", 1.2), _run("finetune_off", 1.2), _run("mlx_lm", 1.0), _run("peft", 1.0)])
    )
    assert figs["training.equal.finetune_over_peft"].met is False


def test_release_summary_judges_end_to_end_with_the_one_off_cost():
    equal = [_run("finetune", 1.0), _run("finetune_off", 1.0), _run("mlx_lm", 1.0), _run("peft", 1.0)]
    release = [
        _run("finetune", 1.0, setting="release", one_off=6.0),
        _run("finetune_off", 3.0, setting="release"),
        _run("mlx_lm", 3.0, setting="release"),
        _run("peft", 2.0, setting="release"),
    ]
    figs = _figs(_summary(equal, release, _settings("release", profile="release", profile_iters=120)))
    # finetune: 6 steps x 200 tokens over 6 s of loop + 6 s of prefix; peft 12 s; mlx_lm 18 s
    assert figs["training.release.finetune_e2e_tokens_per_s"].value == pytest.approx(100.0)
    vs_peft, vs_mlx = (
        figs["training.release.finetune_over_peft"],
        figs["training.release.finetune_over_mlx_lm"],
    )
    assert (
        vs_peft.value == pytest.approx(1.0)
        and vs_peft.met is False
        and "steady-step ratio 2.000" in vs_peft.detail
    )
    assert vs_mlx.value == pytest.approx(1.5) and vs_mlx.met is True
    assert figs["training.release.shortcuts_on_over_off"].value == pytest.approx(1.5)
    s = _summary(equal, release, _settings("release", profile="release", profile_iters=120))
    proj = next(n for n in s.notes if "Projected to the profile's own 120 steps" in n)
    # 120 steps: finetune 6 + 120 s, peft 240 s: 240 / 126
    assert f"finetune/peft {240 / 126:.3f}" in proj


def test_summary_flags_losses_that_disagree_between_shortcuts_on_and_off():
    on, off = _run("finetune", 1.0, losses=[3.0, 2.0]), _run("finetune_off", 1.0, losses=[3.0, 2.01])
    runs = [on, off, _run("mlx_lm", 1.0), _run("peft", 1.0)]
    fig = _figs(_summary(runs))["training.equal.loss_on_vs_off"]
    assert fig.value == pytest.approx(0.01 / 3.0) and fig.met is False


def test_late_reassociation_drift_near_zero_loss_is_judged_on_the_runs_loss_scale():
    # 4e-5 apart at a loss of 0.1 (4e-4 relative there) after starting at 4.0: 1e-5 of the run's scale
    on, off = (
        _run("finetune", 1.0, losses=[4.0, 1.0, 0.10004]),
        _run("finetune_off", 1.0, losses=[4.0, 1.0, 0.1]),
    )
    runs = [on, off, _run("mlx_lm", 1.0), _run("peft", 1.0)]
    fig = _figs(_summary(runs))["training.equal.loss_on_vs_off"]
    assert fig.value == pytest.approx(4e-5 / 4.0) and fig.met is True
    assert "4.00e-04 relative (step 3, loss 0.1)" in fig.detail


def test_training_summary_reports_failed_runs():
    bad = training_runs.Run("peft", 0, error="exit 1: boom")
    s = _summary([_run("finetune", 1.0), _run("finetune_off", 1.0), _run("mlx_lm", 1.0), bad])
    figs = _figs(s)
    assert figs["training.equal.peft_tokens_per_s"].value is None
    assert figs["training.equal.finetune_over_peft"].met is None
    assert any("boom" in n for n in s.notes)


def test_loss_token_note_reports_counts_per_tool():
    check = {
        "rows": 8,
        "mlx_lm_rows": 8,
        "finetune_loss_tokens": 40,
        "mlx_lm_loss_tokens": 56,
        "same_ids": 8,
        "same_ids_prefix": 8,
        "same_prompt_mask": 8,
    }
    data = {**DATA, "epoch_steps": 2, "loss_tokens": check}
    peft = training_runs.Run("peft", 0, "release", extra={"loss_tokens": [19, 21, 20]})
    note = training_summary.loss_token_note(_settings("release"), [peft], data)
    assert (
        "FineTune 40" in note
        and "counted 40 over its first epoch" in note
        and "mlx-lm 56 (+16, +2.0 per row)" in note
    )
    assert "masked prompt identical in 8/8" in note


def test_mlx_lm_config_mirrors_settings(tmp_path):
    cfg = training_tools.mlx_lm_config(
        _settings(keys=["self_attn.q_proj"]), tmp_path / "data", tmp_path / "a"
    )
    assert cfg["num_layers"] == 8 and cfg["batch_size"] == 4 and cfg["mask_prompt"] is False
    assert cfg["lora_parameters"] == {"rank": 8, "scale": 20.0, "dropout": 0.0, "keys": ["self_attn.q_proj"]}
    assert cfg["steps_per_report"] == 1 and cfg["steps_per_eval"] > cfg["iters"]
    release = training_tools.mlx_lm_config(
        _settings("release"), tmp_path / "d", tmp_path / "a", model_path="/copy"
    )
    assert release["mask_prompt"] is True and release["model"] == "/copy"


def test_verbatim_model_links_weights_and_replaces_the_chat_template(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "model.safetensors").write_bytes(b"w")
    (src / "chat_template.jinja").write_text("{{ 'system prompt' }}")
    (src / "tokenizer_config.json").write_text(json.dumps({"eos_token": "<e>", "chat_template": "x"}))
    dst = training_tools.verbatim_model(src, tmp_path / "dst")
    assert (dst / "model.safetensors").is_symlink()
    assert json.loads((dst / "tokenizer_config.json").read_text()) == {
        "eos_token": "<e>",
        "chat_template": training_tools.VERBATIM_TEMPLATE,
    }
    assert (dst / "chat_template.jinja").read_text() == training_tools.VERBATIM_TEMPLATE
    assert training_tools.verbatim_model(src, dst) == dst  # rebuilt in place


def test_mlx_lm_reads_each_split_as_prompt_completion_rows(tmp_path):
    row = {"text": "Q: hi\nA: yo", "train_spans": [[9, 11]]}
    (tmp_path / "train.jsonl").write_text(json.dumps(row) + "\n\n")
    out = training_tools.write_completion_rows(tmp_path, tmp_path / "mlx")
    assert [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()] == [
        {"prompt": "Q: hi\nA: ", "completion": "yo"}
    ]
    assert not (out / "valid.jsonl").exists()


def test_stream_returns_exit_code_and_peak_rss(tmp_path):
    import sys

    seen = []
    cmd = [sys.executable, "-c", "print('a'); print('b')"]
    code, rss = training_tools.stream(
        cmd, {}, tmp_path / "log", 60, lambda line, t: seen.append(line.strip())
    )
    assert code == 0 and seen == ["a", "b"] and rss > 1024 * 1024
    assert (tmp_path / "log").read_text() == "a\nb\n"


def test_a_round_runs_every_tool_in_rotated_order_and_logs_failures(monkeypatch, tmp_path):
    order, lines = [], []

    def fake(tool):
        def run(st, work, *args, **kw):
            name = tool if kw.get("shortcuts", True) else "finetune_off"
            order.append(name)
            return training_runs.Run(name, 1, st.key, wall_s=2.0, error="boom" if name == "peft" else None)

        return run

    monkeypatch.setattr(training, "run_finetune", fake("finetune"))
    monkeypatch.setattr(training, "run_mlx_lm", fake("mlx_lm"))
    monkeypatch.setattr(training, "run_peft", fake("peft"))
    prepared = {"mlx_data": tmp_path, "mlx_model": "m", "examples": tmp_path / "e.json"}
    runs = training.run_round(_settings(), prepared, tmp_path, 1, 60.0, lines.append)
    assert order == ["finetune_off", "mlx_lm", "peft", "finetune"] == [r.tool for r in runs]
    assert lines[2] == "  training equal peft round 1: 2 s FAILED boom"


# ---------------------------------------------------------------- other sections


def _probe(peak):
    return {"peak_bytes": peak, "batch_shape": [4, 65], "trainable_params": 10}


def _memory_row(measured, predicted, error_pct):
    return {
        "measured": _probe(measured),
        "predicted_bytes": predicted,
        "error_pct": error_pct,
        "predicted_params": 10,
        "breakdown": {"weights": predicted},
    }


def test_memory_summary_passes_within_and_fails_outside_15_percent():
    rows = {"lora": _memory_row(1000, 1100, 10.0), "full": _memory_row(4000, 3000, -25.0)}
    section = memory_bench.summarize("m", {"long answers": rows}, {"long prompts": "no package"})
    figs = {f.key: f for f in section.figures}
    assert figs["memory.long_answers.lora_error_pct"].met is True
    full = figs["memory.long_answers.full_error_pct"]
    assert full.met is False and "undershoots" in full.reason
    assert figs["memory.long_answers.lora_saving"].value == pytest.approx(75.0)
    skipped = figs["memory.long_prompts.lora_error_pct"]  # a dataset not measured is said, never a pass
    assert skipped.value is None and skipped.met is None and "no package" in skipped.reason


def test_blas_summary_flags_reference_blas():
    slow = {
        "n": 8,
        "mlx_gflops": [2.0],
        "numpy_gflops": [50.0],
        "ratios": [0.04],
        "active_blas": "reference",
        "library": None,
        "openblas_threads": "1",
    }
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


def _recorded(seconds, status, model, recorded, source):
    return {"seconds": seconds, "status": status, "model": model, "recorded": recorded, "source": source}


def test_tiers_summary_budgets_failures_and_recorded_reports():
    live = {
        "tier1": {"seconds": 3.0, "exit_code": 0, "summary": "13 passed"},
        "make_test": {"seconds": 400.0, "exit_code": 1, "summary": "1 failed"},
    }
    recorded = {
        "tier2": _recorded(421.0, "passed", "smollm2", "2026-11-25", "x"),
        "tier3": _recorded(12.0, "failed", "tiny-llama", "2026-11-25", "y"),
    }
    figs = {f.key: f for f in tiers.summarize(live, recorded).figures}
    assert figs["tiers.tier1_s"].met is True
    assert figs["tiers.make_test_s"].met is False and "did not all pass" in figs["tiers.make_test_s"].reason
    assert figs["tiers.tier2_s"].met is False and figs["tiers.tier2_s"].recorded == "2026-11-25"
    assert figs["tiers.tier3_s"].value is None and "did not pass" in figs["tiers.tier3_s"].reason


def test_recorded_tiers_prefer_a_passed_run_on_the_default_model(tmp_path):
    for name, tier, status, model, when in (
        ("tier3-a", "pipeline", "failed", "smollm2-135m", "2026-11-26"),
        ("tier3-b", "pipeline", "passed", "smollm2-135m", "2026-11-20"),
        ("tier3-c", "pipeline", "passed", "gemma3-270m", "2026-11-27"),  # newer, but not the default model
        ("tier2-d", "run", "passed", "smollm2-135m", "2026-11-21"),  # another tier's report
        ("quick-e", "pipeline", "passed", "smollm2-135m", "2026-11-28"),  # not a tier run
    ):
        (tmp_path / name).mkdir()
        report_json = {"seconds": 1.0, "status": status, "model": model, "finished_at": when, "command": tier}
        (tmp_path / name / "report.json").write_text(json.dumps(report_json))
    assert tiers.recorded_tier3(tmp_path)["source"].endswith("tier3-b/report.json")
    assert tiers.recorded_tier2(tmp_path)["source"].endswith("tier2-d/report.json")
    assert tiers.recorded_tier3(tmp_path / "none") is None


def test_tier_runs_are_also_judged_against_the_speed_goals():
    recorded = {
        "tier2": _recorded(43.0, "passed", "smollm2-135m", "d", "x"),
        "tier3": _recorded(160.0, "passed", "smollm2-135m", "d", "y"),
    }
    figs = {f.key: f for f in tiers.summarize({}, recorded).figures}
    assert figs["tiers.tier2_speed_s"].met is True and figs["tiers.tier3_speed_s"].met is False
    assert figs["tiers.tier3_s"].met is True  # within the README's 15-minute budget all the same


def test_where_a_tiers_time_goes_is_read_per_model_from_its_newest_passed_report(tmp_path):
    from bench.stats import Section

    def report(name, command, model, status, seconds, **stages):
        (tmp_path / name).mkdir()
        data = {"seconds": seconds, "status": status, "model": model, "finished_at": name, "command": command,
                "stages": [{"name": k, "seconds": v} for k, v in stages.items()]}  # fmt: skip
        (tmp_path / name / "report.json").write_text(json.dumps(data))

    report("tier2-a", "run", "smollm2-135m", "passed", 43.0, train=30.0, judge=10.5)
    report("tier2-b", "run", "gemma3-270m", "passed", 117.8, train=61.4, judge=52.8)
    report("tier2-c", "run", "gemma3-270m", "failed", 80.0, train=60.0, judge=15.0)  # newer, did not pass
    report("tier3-d", "pipeline", "smollm2-135m", "passed", 200.0, train=55.0, evaluate=22.0)
    s = Section("tiers", "t")
    tiers.stage_figures(s, tmp_path)
    figs = {f.key: f for f in s.figures}
    ratio = figs["tiers.smollm2_tier2_judge_ratio"]
    assert ratio.value == pytest.approx(0.35) and ratio.met is True and "judge 10.5 s" in ratio.detail
    assert figs["tiers.gemma_tier2_run_s"].value == 117.8 and figs["tiers.gemma_tier2_run_s"].met is False
    assert (
        figs["tiers.smollm2_tier3_evaluate_s"].value == 22.0
        and figs["tiers.smollm2_tier3_evaluate_s"].met is False
    )
    gemma3 = figs["tiers.gemma_tier3_evaluate_s"]
    assert gemma3.value is None and gemma3.met is None and "run the tier on gemma3-270m" in gemma3.reason


def test_inference_summary_reports_skipped_engines():
    runs = {
        "runs": [
            {"tps": 10.0, "tokens": 64, "prompt_tps": 100.0},
            {"tps": 12.0, "tokens": 64, "prompt_tps": 90.0},
        ]
    }
    llamacpp = {"runs": [{"tps": 44.0, "tokens": 64, "prompt_tps": 80.0}]}
    results = {"mlx": runs, "llamacpp": llamacpp, "ollama": {"skipped": "no ollama on PATH"}}
    s = inference.summarize("m", results, 64)
    figs = {f.key: f for f in s.figures}
    assert figs["inference.mlx_tokens_per_s"].value == pytest.approx(11.0)
    assert figs["inference.mlx_over_llamacpp"].value == pytest.approx(0.25)
    assert (
        figs["inference.ollama_tokens_per_s"].value is None and figs["inference.ollama_tokens_per_s"].reason
    )


# ---------------------------------------------------------------- report


MACHINE = {
    "cpu_model": "Test CPU",
    "cpu_count": 2,
    "memory_total_bytes": 24 * 1024**3,
    "platform": "Linux",
    "python": "3.11",
    "loadavg_start": "1.0",
    "loadavg_end": "2.0",
    "env": {"OPENBLAS_NUM_THREADS": "1"},
}
META = {
    "date": "2026-11-25T00:00:00+00:00",
    "mode": "full",
    "seconds": 600,
    "commit": "abc123",
    "machine": MACHINE,
    "versions": {"mlx": "0.32.4", "torch": None},
}


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
    cfg = {
        "hidden_size": 4,
        "intermediate_size": 8,
        "num_attention_heads": 2,
        "num_key_value_heads": 1,
        "vocab_size": 10,
        "num_hidden_layers": 3,
    }
    block = 2 * 4 * 4 + 2 * 4 * 2 + 3 * 4 * 8  # q,o + k,v + gate,up,down
    tokens = 2 * 4  # batch 2, width 5 feeds 4 positions
    expected = 2 * tokens * (3 * block + 40) + 2 * tokens * (1 * block + 40)
    assert training_runs.step_gflop(cfg, 2, 5, 1) == pytest.approx(expected / 1e9)


def test_training_summary_explains_the_matmul_floor():
    data = {**DATA, "step_gflop": 100.0, "matmul_gflops": 50.0, "vocab_size": 49152}
    runs = [_run("finetune", 3.0), _run("finetune_off", 4.0), _run("mlx_lm", 4.0), _run("peft", 2.0)]
    s = training_summary.summarize([_settings()], runs, {"equal": data})
    floor = next(n for n in s.notes if n.startswith("(equal) Matmul floor"))
    assert "2.00 s, 50% of FineTune's median step without shortcuts (4.00 s)" in floor
    assert "torch + peft takes 2.00 s" in _figs(s)["training.equal.finetune_over_peft"].reason


def test_the_bench_times_make_test_as_the_makefile_runs_it():
    from bench.tiers import MAKE_TEST

    root = Path(__file__).resolve().parents[2]
    recipe = root.joinpath("Makefile").read_text().split("\ntest: setup\n", 1)[1].split("\n\n", 1)[0]
    args = recipe.replace("\\\n", " ").split()
    assert args[:2] == ["$(PYTEST)", "-q"] and args[2:] == MAKE_TEST


def _metrics(folder: Path, rows: list[tuple[float, float, float]]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    lines = [json.dumps({"kind": "train", "step": i + 1, "time": t, "trained_tokens": n, "train_loss": loss})
             for i, (t, n, loss) in enumerate(rows)]  # fmt: skip
    (folder / "metrics.jsonl").write_text("\n".join([*lines, json.dumps({"kind": "val", "step": 1})]) + "\n")
    return folder


def test_ranks_figures_read_steady_steps_from_the_runs_metrics(tmp_path):
    from bench import ranks_bench

    # 3 warmup steps (slow), then 1 s per step and 100 tokens per step
    one = _metrics(tmp_path / "one", [(0, 100, 5.0), (5, 200, 4.0), (9, 300, 3.0), (12, 400, 2.0), (13, 500, 1.0),
                                      (14, 600, 0.5), (15, 700, 0.25)])  # fmt: skip
    two = _metrics(tmp_path / "two", [(0, 100, 5.0), (5, 200, 4.0), (9, 300, 3.0), (12, 400, 2.0),
                                      (12.5, 500, 1.0), (13, 600, 0.5), (13.5, 700, 0.2)])  # fmt: skip
    assert ranks_bench.tokens_per_second(one) == 100 and ranks_bench.tokens_per_second(two) == 200
    assert ranks_bench.step_seconds(one) == 1 and ranks_bench.step_seconds(two) == 0.5
    assert ranks_bench.loss_gap(one, two) == pytest.approx(0.2)  # |0.2 - 0.25| / 0.25
