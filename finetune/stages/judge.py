"""The judge stage: measure what the run saved on disk, one small function per training gate (a gate
declared by its row alone is judged by judge_declared).

Each function reads the artifacts its gate is about and returns that gate's verdict with the bytes it judged
(explain). What several gates share is measured once: the learning probe (base + SAVED adapter answering the
training questions, and their perplexity on general text) serves model_learning, artifacts and forgetting.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.gates import label_mask as label_mask_gate
from finetune.gates import training as gates
from finetune.gates.provenance import explain
from finetune.gates.registry import GATES, TRAINING_GATES, Gate
from finetune.gates.split_overlap import HELD_OUT, split_overlap
from finetune.gates.verdict import Verdict, skipped
from finetune.report.models import StageReport
from finetune.stages.context import BASE_LEARNING, Ctx, Stage
from finetune.system.jsonl import read_jsonl
from finetune.train.checkpoints import ADAPTER_DIR, INIT_DIR, RESULT
from finetune.train.metrics import METRICS, read_metrics, train_losses
from finetune.train.splits import TOKENS


@dataclass
class Judging:
    """What the judges of one run share: the run, its base model, its tokenizer and stop strings, timings."""

    ctx: Ctx
    base: Path
    tokenizer: Any
    stops: list[str]
    seconds: dict[str, float] = field(default_factory=dict)  # where the judge's time goes
    learning: Any = None
    load_problem: str | None = None
    notes: list[str] = field(default_factory=list)  # what happened to the work done beside training

    @contextlib.contextmanager
    def timed(self, what: str) -> Iterator[None]:
        tic = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[what] = round(time.perf_counter() - tic, 2)

    def measure_learning(self) -> None:
        from finetune.evaluate.budget import answer_budget

        run_dir, cfg = self.ctx.run_dir, self.ctx.cfg
        pending = self.ctx.beside.pop(BASE_LEARNING, None)  # measured beside training, maybe still running

        def base_ready() -> None:
            nonlocal pending
            if pending is not None:
                with self.timed("waited for the base"):
                    self.notes.append(pending(False))
                pending = None

        try:
            with self.timed("learning"):
                budget = answer_budget(run_dir / "data", self.tokenizer).tokens  # as training's hook used
                self.learning = self.ctx.deps.measure_learning(
                    run_dir, self.base, cfg, self.stops, max_tokens=budget, base_ready=base_ready
                )
        except Exception as exc:  # the saved adapter does not load: that is the finding
            self.load_problem = f"base + saved adapter does not load: {type(exc).__name__}: {str(exc)[:300]}"
        finally:
            base_ready()  # its answers are kept for the next run however this one went


def judge_loss(j: Judging) -> Verdict:
    g, path = j.ctx.cfg.gates, j.ctx.run_dir / METRICS
    losses = train_losses(read_metrics(path))
    window = min(g.loss_window, max(1, len(losses) // 2))
    v = gates.loss_convergence(
        losses, drop=g.loss_drop, window=window, max_initial=g.max_initial_loss, max_final=g.max_final_loss
    )
    return explain(v, path)


def judge_learning(j: Judging) -> Verdict:
    threshold, m = j.ctx.cfg.gates.learning_improvement, j.learning
    if m is None:
        v = gates.model_learning([], [], [], loss_before=0, loss_after=0, threshold=threshold)
        v.detail = j.load_problem or v.detail
    else:
        v = gates.model_learning(
            m.before,
            m.after,
            m.references,
            loss_before=m.loss_before,
            loss_after=m.loss_after,
            threshold=threshold,
        )
    return explain(v, j.ctx.run_dir / ADAPTER_DIR)


def judge_forgetting(j: Judging) -> Verdict:
    from finetune.evaluate.general_text import GENERAL_TEXTS

    m, limit = j.learning, j.ctx.cfg.gates.max_perplexity_ratio
    before, after = (m.general_before, m.general_after) if m is not None else (None, None)
    v = gates.forgetting(before, after, texts=len(GENERAL_TEXTS), max_ratio=limit)
    if m is None:
        v.detail = j.load_problem or v.detail
    return explain(v, j.ctx.run_dir / ADAPTER_DIR)


def judge_artifacts(j: Judging) -> Verdict:
    from finetune.evaluate import run_measurements

    run_dir = j.ctx.run_dir
    problems = run_measurements.artifact_problems(run_dir) + ([j.load_problem] if j.load_problem else [])
    answers = j.learning.after if j.learning else None
    return explain(
        gates.artifacts(problems, answers, run_measurements.in_memory_answers(run_dir)), run_dir / ADAPTER_DIR
    )


def judge_parameters(j: Judging) -> Verdict:
    from finetune.evaluate import run_measurements

    ctx, run_dir = j.ctx, j.ctx.run_dir
    problem = None
    try:
        init, final = (
            run_measurements.adapter_tensors(run_dir / INIT_DIR),
            run_measurements.adapter_tensors(run_dir / ADAPTER_DIR),
        )
    except Exception as exc:
        init, final, problem = {}, {}, f"{type(exc).__name__}: {exc}"
    steps = json.loads((run_dir / RESULT).read_text()).get("steps", 0) if (run_dir / RESULT).is_file() else 0
    v = gates.parameter_updates(
        init,
        final,
        steps=steps,
        base_recorded=ctx.outputs["model"]["base_files"],
        base_now=run_measurements.base_file_digests(j.base),
        fine_tune_type=ctx.cfg.training.fine_tune_type,
        threshold=ctx.cfg.gates.lora_params_changed,
    )
    if not init and (problem or j.load_problem):
        v.detail = f"{problem or j.load_problem}; {v.detail}"
    return explain(v, run_dir / ADAPTER_DIR)


def judge_label_mask(j: Judging) -> Verdict:
    cfg = j.ctx.cfg
    try:
        rows = j.ctx.deps.masked_rows(j.ctx.run_dir, j.tokenizer, cfg.data.max_seq_length)
        ends = [*j.stops, j.tokenizer.eos_token or ""]
        v = label_mask_gate.label_mask(rows, mask_prompt=cfg.data.mask_prompt, end_markers=ends)
    except (OSError, ValueError, KeyError) as exc:
        v = label_mask_gate.label_mask([], mask_prompt=cfg.data.mask_prompt)
        v.detail = f"cannot read the recorded training rows: {exc}"
    return explain(v, j.ctx.run_dir / TOKENS)


def judge_split_overlap(j: Judging) -> Verdict:
    data = j.ctx.run_dir / "data"
    splits = {
        n: read_jsonl(data / f"{n}.jsonl") for n in ("train", *HELD_OUT) if (data / f"{n}.jsonl").is_file()
    }
    return explain(split_overlap(splits), data)


def judge_memory(j: Judging) -> Verdict:
    ctx = j.ctx
    with j.timed("memory"):
        m = ctx.deps.measure_memory(
            ctx.run_dir,
            j.base,
            ctx.outputs["model"]["config"],
            ctx.cfg,
            available=ctx.deps.available_memory(),
            run_peak=ctx.outputs.get("train", {}).get("peak_memory_bytes"),  # recorded by this run's training
        )
    v = gates.memory_efficiency(m.lora_peak, m.full_peak, saving=ctx.cfg.gates.memory_saving, source=m.source)
    v.detail += f" ({m.detail})"
    return explain(v)


# The judge of each training gate that needs more than its row (a declared one: judge_declared).
JUDGES: dict[str, Callable[[Judging], Verdict]] = {
    "loss_convergence": judge_loss,
    "model_learning": judge_learning,
    "artifacts": judge_artifacts,
    "forgetting": judge_forgetting,
    "parameter_updates": judge_parameters,
    "label_mask": judge_label_mask,
    "split_overlap": judge_split_overlap,
    "memory_efficiency": judge_memory,
}


def judge_declared(j: Judging, gate: Gate) -> Verdict:
    """A gate declared by its row alone (finetune.gates.registry: its metric of train_result.json)."""
    path = j.ctx.run_dir / RESULT
    try:
        result = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        result = {"unreadable": f"{path}: {type(exc).__name__}: {exc}"}
    return explain(gates.declared_gate(gate, result, getattr(j.ctx.cfg.gates, gate.threshold)), path)


def stage_judge(ctx: Ctx) -> StageReport:
    """Measure from what the run saved and judge; every gate the command requires gets a verdict."""
    from finetune.data.templates import get_template

    base = Path(ctx.outputs["model"]["path"])
    tokenizer = ctx.deps.load_tokenizer(base)
    stops = get_template(ctx.cfg.data.template, tokenizer=tokenizer).stop_strings
    j = Judging(ctx, base, tokenizer, stops)
    skip = ctx.cfg.gates.skip
    verdicts = [
        skipped(n, f"skipped by gates.skip ({n})")
        for n in ctx.required_gates
        if n in skip and n in TRAINING_GATES
    ]
    # the table's order, the memory measurement (the slowest) last
    wanted = sorted((n for n in TRAINING_GATES if ctx.wants(n)), key=lambda n: n == "memory_efficiency")
    if {"model_learning", "artifacts", "forgetting"} & set(wanted):
        j.measure_learning()
    verdicts += [JUDGES[n](j) if n in JUDGES else judge_declared(j, GATES[n]) for n in wanted]
    failed = [v.name for v in verdicts if v.status == "failed"]
    details = {"failed": failed, "judged": [v.name for v in verdicts], "seconds": j.seconds}
    if j.notes:
        details["beside_training"] = "; ".join(j.notes)
    return StageReport(outputs={"verdicts": [v.name for v in verdicts]}, verdicts=verdicts, details=details)


def judge_inputs(ctx: Ctx) -> dict[str, Any]:
    wanted = sorted(n for n in ctx.required_gates if ctx.wants(n))
    return {**ctx.section("gates"), "gates_wanted": wanted, **ctx.upstream("model", "data", "train")}


JUDGE = Stage("judge", stage_judge, judge_inputs)
