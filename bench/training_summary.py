"""The training section's figures, tables and notes from the runs of bench/training_tools.py (pure)."""

from __future__ import annotations

import os
from dataclasses import asdict
from typing import Any

from bench.stats import Figure, Goal, Section, fmt, median, ratio, spread, steady
from bench.training_runs import (
    LABELS,
    SETTING_TITLES,
    TOOLS,
    Run,
    Settings,
    max_relative_difference,
    median_or_none,
    per_round,
    round_ratios,
)

GOAL_RELEASE = Goal(">=", 1.5)  # release profile, shortcuts on, end-to-end: vs peft and vs mlx_lm
GOAL_EQUAL_VS_PEFT = Goal(">=", 1.0)
GOAL_LOSS_AGREEMENT = Goal("<=", 1e-4, "≤ 1e-4 of the first step's loss")
MIB = 2**20
COLUMNS = [
    "tool",
    "steps timed",
    "median step s",
    "range s",
    "steady tokens/s",
    "end-to-end tokens/s",
    "one-off s",
    "loop s",
    "peak MiB (MLX; peft: RSS)",
    "process peak RSS MiB",
    "last loss",
    "tool's own tokens/s",
]


def _mib(value: float | None) -> str:
    return f"{value / MIB:.0f}" if value else "—"


def _num(value: float | None, digits: int = 1) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def _ratio_figure(
    key: str, label: str, values: dict, pooled: dict, a: str, b: str, goal, what: str
) -> Figure:
    rounds = round_ratios(values, a, b)
    pooled_ratio = ratio(pooled.get(a), pooled.get(b))
    value = median(rounds) if rounds else pooled_ratio
    listed = ", ".join(f"{x:.3f}" for x in rounds) or "—"
    detail = (
        f"{what}; median of per-round ratios ({listed}), ratio of pooled medians {fmt(pooled_ratio, '×')}"
    )
    return Figure(key, label, value, "×", goal, detail=detail)


def loss_agreement(runs: list[Run]) -> tuple[float | None, list[str]]:
    """Max |on - off| per-step loss difference of each round's shortcuts-on and -off runs, over the first
    step's loss (the run's loss scale). Per step, the relative difference also shows where it is largest:
    float32 reassociation drifts over many Adam steps and weighs most where the loss is near 0; each round's
    part names its worst step and the loss there."""
    worst, parts = None, []
    for rnd in sorted({r.round for r in runs}):
        on = next((r for r in runs if r.tool == "finetune" and r.round == rnd and not r.error), None)
        off = next((r for r in runs if r.tool == "finetune_off" and r.round == rnd and not r.error), None)
        if on is None or off is None or not on.losses or not off.losses:
            continue
        n = min(len(on.losses), len(off.losses))
        diffs = [abs(a - b) for a, b in zip(on.losses, off.losses, strict=False)]
        d = max(diffs) / max(abs(off.losses[0]), 1e-12)
        at = max(range(n), key=lambda i: diffs[i] / max(abs(off.losses[i]), 1e-12))
        worst = d if worst is None else max(worst, d)
        relative = max_relative_difference(on.losses, off.losses)
        parts.append(
            f"round {rnd}: {n} steps, max |diff| {max(diffs):.2e} = {d:.2e} of the first loss; "
            f"per step at most {relative:.2e} relative (step {at + 1}, loss {off.losses[at]:.3g})"
        )
    return worst, parts


def _tool_row(t: str, st: Settings, runs: list[Run], steps: list[float], med, tps, e2e) -> list:
    """One tool's row of a setting's table (COLUMNS)."""
    ok = [r for r in runs if r.tool == t and not r.error]

    def of(attr: str) -> float | None:
        return median_or_none(getattr(r, attr) for r in ok)

    span = spread(steps)
    own = median([x for r in runs if r.tool == t for x in steady(r.internal_tps, st.warmup, 1)])
    last = median_or_none(r.losses[-1] for r in ok if r.losses)
    return [
        LABELS[t],
        len(steps),
        _num(med, 3),
        f"{span[0]:.2f}–{span[1]:.2f}" if span else "—",
        _num(tps),
        _num(e2e),
        _num(of("one_off_s")),
        _num(of("loop_s")),
        _mib(of("peak_bytes")),
        _mib(of("rss_bytes")),
        _num(last, 3),
        _num(own),
    ]


def summarize_setting(s: Section, st: Settings, runs: list[Run], data: dict[str, Any]) -> dict[str, Any]:
    """Add one setting's figures, table and notes to s; return its raw numbers (pure)."""
    runs = [r for r in runs if r.setting == st.key]
    k, release = f"training.{st.key}", st.key == "release"
    tokens_per_step = st.batch_size * data["mean_length"]
    steps = {
        t: [x for r in runs if r.tool == t and not r.error for x in r.step_seconds(st.warmup)] for t in TOOLS
    }
    med = {t: median(v) for t, v in steps.items()}
    tps = {t: (tokens_per_step / med[t] if med[t] else None) for t in TOOLS}

    def steady_tps(r: Run) -> float | None:
        m = median(r.step_seconds(st.warmup))
        return tokens_per_step / m if m else None

    steady_rounds = per_round(runs, steady_tps)
    e2e_rounds = per_round(runs, lambda r: r.end_to_end_tps(tokens_per_step))
    e2e = {t: median_or_none(v for (tool, _), v in e2e_rounds.items() if tool == t) for t in TOOLS}

    rows = [_tool_row(t, st, runs, steps[t], med[t], tps[t], e2e[t]) for t in TOOLS]
    title = f"({st.key}) {SETTING_TITLES.get(st.key, st.key)}, {st.iters} steps per run"
    s.table(COLUMNS, rows, title=title)

    for t in TOOLS:
        median_step = _num(med[t], 3)
        if release:
            key, label, value = f"{k}.{t}_e2e_tokens_per_s", f"release: {LABELS[t]}, end-to-end", e2e[t]
            detail = f"steady {fmt(tps[t], 'tokens/s')} (median step {median_step} s)"
        else:
            key, label, value = f"{k}.{t}_tokens_per_s", f"equal: {LABELS[t]}", tps[t]
            detail = f"median step {median_step} s over {len(steps[t])} steps"
        s.add(Figure(key, label, value, "tokens/s", detail=detail))

    if release:  # judged end to end, the steady-step ratio alongside
        values, pooled, what = e2e_rounds, e2e, "end-to-end tokens/s"
    else:
        values, pooled, what = steady_rounds, tps, "steady tokens/s"

    def finetune_over(other: str, key: str, label: str, goal: Goal | None) -> None:
        f = s.add(_ratio_figure(key, label, values, pooled, "finetune", other, goal, what))
        if release:
            f.detail += f"; steady-step ratio {fmt(ratio(tps['finetune'], tps[other]), '×')}"

    vs_peft, vs_mlx_lm = (GOAL_RELEASE, GOAL_RELEASE) if release else (GOAL_EQUAL_VS_PEFT, None)
    versus, on_off = f"{st.key}: finetune (shortcuts on) /", f"{st.key}: finetune shortcuts on / off"
    finetune_over("peft", f"{k}.finetune_over_peft", f"{versus} peft", vs_peft)
    finetune_over("mlx_lm", f"{k}.finetune_over_mlx_lm", f"{versus} mlx_lm", vs_mlx_lm)
    finetune_over("finetune_off", f"{k}.shortcuts_on_over_off", on_off, None)

    worst, parts = loss_agreement(runs)
    label = f"{st.key}: per-step loss, shortcuts on vs off (max difference / first loss)"
    detail = "same seed and batches; " + ("; ".join(parts) or "no pair of runs")
    reason = "" if worst is not None else "no successful pair of shortcuts on/off runs"
    s.add(Figure(f"{k}.loss_on_vs_off", label, worst, "", GOAL_LOSS_AGREEMENT, detail=detail, reason=reason))

    s.notes.append(_settings_note(st, data))
    if data.get("loss_tokens"):
        s.notes.append(loss_token_note(st, runs, data))
    if release:
        s.notes.append(_release_note(st, runs, tokens_per_step, e2e))
    else:
        _floor_notes(s, st, data, med)
    return {
        "median_step_s": med,
        "tokens_per_s": tps,
        "end_to_end_tokens_per_s": e2e,
        "loss_agreement": parts,
    }


def _settings_note(st: Settings, data: dict[str, Any]) -> str:
    """What one setting trains: model, LoRA, batch, schedule, rounds and the data's lengths and widths."""
    keys = st.keys or "all 7 block linears (mlx-lm default)"
    return (
        f"({st.key}) {st.model} float32, profile `{st.profile}`: LoRA rank {st.rank}, scale {st.scale:g} (peft alpha "
        f"{st.scale * st.rank:g}), dropout {st.dropout:g}, last {st.num_layers} blocks, keys {keys}, batch "
        f"{st.batch_size}, max_seq_length {st.max_seq_length}, Adam lr {st.learning_rate:g}, mask_prompt "
        f"{'on' if st.mask_prompt else 'off'}; "
        f"{st.iters} steps per run ({st.warmup} warm-up, last dropped for the steady median), {st.rounds} "
        f"interleaved round(s), the order rotating each round. Data: {data['examples']} training examples "
        f"({data['source']}), {data['min_length']}–{data['max_length']} tokens (mean {data['mean_length']:.1f}), "
        f"{data.get('epoch_steps', '?')} steps per epoch; padded widths FineTune/peft {sorted(data['widths'])}, "
        f"mlx-lm {sorted(data['widths_mlx_lm'])}. tokens/s counts every real token (prompt included): "
        f"{st.batch_size} × {data['mean_length']:.1f} per step."
    )


def loss_token_note(st: Settings, runs: list[Run], data: dict[str, Any]) -> str:
    """How many loss targets each tool trains per epoch, and whether the prompts masked are the same."""
    check, n = data["loss_tokens"], data.get("epoch_steps") or 0
    extra = check["mlx_lm_loss_tokens"] - check["finetune_loss_tokens"]
    peft_runs = [r for r in runs if r.tool == "peft" and not r.error]
    counted = [
        sum(r.extra["loss_tokens"][:n]) for r in peft_runs if n and len(r.extra.get("loss_tokens") or []) >= n
    ]
    peft = f"; the peft child counted {counted[0]} over its first epoch" if counted else ""
    if st.mask_prompt:
        tail = "the text after the answer's end token, which FineTune's answer span leaves out"
    else:
        tail = "the EOS its text rows append"
    return (
        f"({st.key}) Loss targets per epoch: FineTune {check['finetune_loss_tokens']} (peft gets the same masks{peft}), "
        f"mlx-lm {check['mlx_lm_loss_tokens']} ({extra:+d}, {extra / max(1, check['rows']):+.1f} per row). Token ids "
        f"identical in {check['same_ids']}/{check['rows']} rows (mlx-lm's start with FineTune's in "
        f"{check['same_ids_prefix']}); masked prompt identical in {check['same_prompt_mask']}/{check['rows']} rows. "
        f"mlx-lm also trains {tail} and one pad target past each example's end (`steps <= lengths` in "
        "mlx_lm.tuner.trainer.default_loss); its head and loss run over every position anyway, so neither changes "
        "its work per step."
    )


def _release_note(st: Settings, runs: list[Run], tokens_per_step: float, e2e: dict) -> str:
    text = (
        f"(release) End-to-end tokens/s = {st.iters} steps × {tokens_per_step:.1f} tokens / (the training loop's wall "
        "time without validation + the one-off cost paid before step 1). Loop time: finetune's train_result.json "
        "wall_time_s minus its evaluations' val_time; mlx-lm from the moment its train() is called to its last step "
        "line, minus its `val` times; peft the child's loop. One-off: finetune's frozen-prefix cache (train + valid "
        "examples; `prefix computed once in X s` in train_result.json extra.shortcuts). Model loading and start-up "
        "are left out for every tool."
    )
    if st.profile_iters and st.profile_iters > st.iters:
        proj = {}
        for t in TOOLS:
            r = [x for x in runs if x.tool == t and not x.error and x.loop_s and x.times]
            if r:
                per_step = median([x.loop_s / len(x.times) for x in r])
                one_off = median([x.one_off_s for x in r]) or 0.0
                proj[t] = st.profile_iters * tokens_per_step / (one_off + st.profile_iters * per_step)
        parts = [
            f"finetune/{o} {fmt(ratio(proj.get('finetune'), proj.get(o)), '×')}"
            for o in ("peft", "mlx_lm", "finetune_off")
        ]
        text += (
            f" Projected to the profile's own {st.profile_iters} steps (each run's loop time per step, the one-off "
            "paid once): " + ", ".join(parts) + "."
        )
    return text


def _floor_notes(s: Section, st: Settings, data: dict[str, Any], med: dict) -> None:
    gflop, speed = data.get("step_gflop"), data.get("matmul_gflops")
    if not (gflop and speed and med.get("finetune_off")):
        return
    floor = gflop / speed
    s.notes.append(
        f"(equal) Matmul floor of a plain step: ≥ {gflop:.0f} GFLOP; at the {speed:.0f} GFLOP/s MLX reached in the "
        f"BLAS section that is {floor:.2f} s, {100 * floor / med['finetune_off']:.0f}% of FineTune's median step "
        f"without shortcuts ({med['finetune_off']:.2f} s). The rest is MLX's non-BLAS CPU ops (elementwise, softmax, "
        f"the {data.get('vocab_size', '?')}-way cross-entropy) and this shared machine's load."
    )
    vs_peft = next((f for f in s.figures if f.key == "training.equal.finetune_over_peft"), None)
    if vs_peft is not None and vs_peft.met is False and med.get("peft") and med.get("finetune"):
        vs_peft.reason = (
            f"at {st.peft_threads} thread(s) each, torch + peft takes {med['peft']:.2f} s per step and FineTune "
            f"{med['finetune']:.2f} s with its shortcuts; with every position carrying loss only the frozen-prefix "
            f"cache saves work, and both run the same ≥ {gflop:.0f} GFLOP of plain-step matmuls at similar BLAS speed."
        )


def summarize(settings: list[Settings], runs: list[Run], data: dict[str, dict[str, Any]]) -> Section:
    """The whole training section: one table per setting, the goal ratios and the notes (pure)."""
    model = settings[0].model if settings else "?"
    s = Section("training", f"Training throughput: LoRA on {model}, four trainers side by side")
    numbers = {st.key: summarize_setting(s, st, runs, data[st.key]) for st in settings}
    threads = settings[0].peft_threads if settings else "?"
    s.notes += [
        "Peak memory: MLX's allocator peak over the training loop for finetune (train_result.json "
        "peak_memory_bytes) and mlx-lm (mx.get_peak_memory(), reset when its train() starts, as finetune does; "
        "weights included); torch has no such counter, so peft's is its process's peak RSS (getrusage). The "
        "process peak RSS column is the same measure for every tool (os.wait4), start-up and libraries included.",
        f"Threads: MLX's BLAS runs {os.environ.get('OPENBLAS_NUM_THREADS', '?')} OpenBLAS thread(s) (FineTune's "
        f"default on this machine); torch gets {threads} (`--peft-threads`).",
        "mlx-lm runs through bench/mlx_lm_child.py: the unchanged `mlx_lm lora` main() with the same environment as "
        "finetune (OpenBLAS preloaded, same thread counts), plus a timestamp when train() starts and its MLX peak at "
        "exit. In the release setting it reads prompt/completion rows cut at the answer span, through a copy of the "
        "model folder whose chat template renders contents verbatim, so its ids are FineTune's own.",
        "\"tool's own tokens/s\" is what each tool reports (mlx-lm's timer covers the compiled step only; FineTune's "
        "metrics carry the same number, counting loss tokens); every ratio uses wall time.",
    ]
    s.data = {
        "settings": [asdict(st) for st in settings],
        "data": data,
        "runs": [asdict(r) for r in runs],
        "numbers": numbers,
    }
    for r in runs:
        if r.error:
            s.notes.append(
                f"FAILED run: {r.setting} {r.tool} round {r.round}: "
                + " / ".join(r.error.strip().splitlines()[-2:])
            )
    return s
