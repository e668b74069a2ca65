"""The stages up to a trained adapter: model -> data -> estimate -> train (the judge: finetune.stages.judge).

`finetune run` is these and the judge; `finetune pipeline` adds the shipping stages (finetune.stages.shipping).
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from pathlib import Path

from finetune import faults
from finetune.data import drops
from finetune.data.sources import DatasetError
from finetune.report.artifacts import artifact
from finetune.report.models import StageReport
from finetune.stages import keys
from finetune.stages.context import BASE_LEARNING, Ctx, Stage, StageError
from finetune.stages.keys import code_version
from finetune.system.atomic import atomic_dir, atomic_write_json, atomic_write_text
from finetune.system.hashing import dir_manifest, file_sha256, json_sha256
from finetune.train.checkpoints import ADAPTER_DIR, BEST_DIR, CHECKPOINTS, INIT_DIR, RESULT, latest_checkpoint
from finetune.train.metrics import METRICS
from finetune.train.splits import TOKENS

TRAIN_KEY = ".train-key"  # which inputs the checkpoints on disk belong to
PROBES = "probes"  # finetune.evaluate.run_measurements.PROBES (imported lazily: the CLI starts fast)
TRAIN_KEPT = ".train-kept.json"  # digests of what a finished training leaves for a resume to build on
TRAIN_OUTPUTS = (CHECKPOINTS, ADAPTER_DIR, BEST_DIR, INIT_DIR, METRICS, RESULT, TOKENS, PROBES, TRAIN_KEPT)
REMADE = (ADAPTER_DIR, RESULT, PROBES, TRAIN_KEPT)  # written at the end of every training, a resumed one too
# Everything the judge reads, so a change to any of them is seen before a verdict is replayed.
TRAIN_ARTIFACTS = (
    ("adapter", ADAPTER_DIR),
    ("metrics", METRICS),
    ("adapter_init", INIT_DIR),
    ("train_tokens", TOKENS),
    ("train_result", RESULT),
    ("probes", PROBES),
)
# Cadence keys: changing them (--override) continues the same training instead of restarting it.
# The ranks sharing each batch change where the work runs, not the maths: a run continues on another count.
CADENCE = (
    "iters",
    "eval_every",
    "save_every",
    "early_stopping_patience",
    "val_batches",
    "ranks",
    "rank_timeout_s",
)


# ---------------------------------------------------------------- model, data, estimate


def stage_model(ctx: Ctx) -> StageReport:
    from finetune.evaluate.run_measurements import base_file_digests

    m = ctx.deps.resolve_model(ctx.cfg.model.name)
    terms = m.license
    outputs = {
        "name": m.name,
        "path": str(m.path),
        "source": m.source,
        "config": m.config,
        "base_files": base_file_digests(Path(m.path)),
        "license": terms,
    }
    details = {"source": m.source, "path": str(m.path), **({"license": terms} if terms else {})}
    return StageReport(outputs=outputs, artifacts=[artifact("base_model", m.path)], details=details)


def stage_data(ctx: Ctx) -> StageReport:
    tokenizer = ctx.deps.load_tokenizer(Path(ctx.outputs["model"]["path"]))
    data_dir = ctx.run_dir / "data"
    with atomic_dir(data_dir) as tmp:  # a config change must not leave another run's files behind
        report = ctx.deps.prepare_data(ctx.cfg.data, tmp, tokenizer)
    counts = {
        n: sum(1 for line in (data_dir / f"{n}.jsonl").read_text().splitlines() if line.strip())
        for n in ("train", "valid", "test")
        if (data_dir / f"{n}.jsonl").is_file()
    }
    if not counts.get("train"):
        raise StageError(f"{data_dir / 'train.jsonl'}: no training rows")
    if counts["train"] < ctx.cfg.training.batch_size:  # bad input (exit 2), not a crash inside training
        raise DatasetError(
            f"{ctx.cfg.data.source}: {counts['train']} training rows, fewer than training.batch_size "
            f"{ctx.cfg.training.batch_size}: add rows, lower training.batch_size, or give train a larger share "
            "of data.splits"
        )
    details = {"counts": counts, "report": report.to_dict() if hasattr(report, "to_dict") else report}
    for line in drops.summary(details["report"]):  # what the data stage dropped is said, not only filed
        ctx.log(f"[data] {line}")
    for note in getattr(report, "notes", []):
        ctx.log(f"[data] {note}")
    return StageReport(
        outputs={"data_dir": str(data_dir), "counts": counts},
        artifacts=[artifact("data", data_dir)],
        details=details,
    )


def stage_estimate(ctx: Ctx) -> StageReport:
    from finetune.data.prepare import read_report

    est = ctx.deps.estimate(ctx.cfg, ctx.outputs["model"]["config"], read_report(ctx.run_dir / "data"))
    ranks = ctx.cfg.training.ranks  # the estimate is one rank's; local ranks each hold their own copy
    details = {"estimate": est.to_dict(), **({"ranks": ranks, "machine_bytes": est.total_bytes * ranks}
                                             if ranks > 1 else {})}  # fmt: skip
    return StageReport(outputs={"total_bytes": est.total_bytes}, details=details)


# ---------------------------------------------------------------- train


def _train_key(ctx: Ctx) -> str:
    inputs = ctx.section("data", "lora", "training")
    for key in CADENCE:
        inputs["training"].pop(key, None)
    return json_sha256(
        {
            **inputs,
            **ctx.upstream("model", "data"),
            "tools": keys.tools(ctx, "train"),
            "code": code_version(),
            "faults": [f for f in faults.injected() if f not in faults.WRITE_ONLY],
        }
    )


def _clear(run_dir: Path, names: tuple[str, ...] = TRAIN_OUTPUTS) -> None:
    for name in names:
        path = run_dir / name
        if path.is_dir():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def _kept(run_dir: Path) -> dict[str, str]:
    """{relative path: sha256} of what a resume builds on: the last checkpoint, the step-0 and best adapters,
    the metrics and the recorded training rows."""
    last = latest_checkpoint(run_dir)
    files = {}
    for path in [*([last] if last else []), *(run_dir / n for n in (INIT_DIR, BEST_DIR, METRICS, TOKENS))]:
        rel = path.relative_to(run_dir).as_posix()
        if path.is_dir():
            files |= {f"{rel}/{name}": sha for name, sha in dir_manifest(path).items()}
        elif path.is_file():
            files[rel] = file_sha256(path)
    return files


def _resumable(ctx: Ctx, key: str) -> bool:
    """The checkpoints belong to these inputs and, after a finished training, are still what it left."""
    run_dir, marker = ctx.run_dir, ctx.run_dir / TRAIN_KEY
    if not (marker.is_file() and marker.read_text().strip() == key and latest_checkpoint(run_dir)):
        return False
    try:
        recorded = json.loads((run_dir / TRAIN_KEPT).read_text())
    except (OSError, ValueError):
        return True  # an interrupted training: its checkpoints are the newest thing it wrote
    now = _kept(run_dir)
    changed = sorted(rel for rel in recorded.keys() | now.keys() if recorded.get(rel) != now.get(rel))
    if changed:
        ctx.log(f"[train] {', '.join(changed[:5])} changed since training finished: training from step 0")
    return not changed


def _prefetch_full_peak(ctx: Ctx, model_path: Path) -> Callable[[bool], str]:
    """The memory gate's full fine-tuning probe, run beside training on the core training leaves idle."""
    if not ctx.wants("memory_efficiency"):
        return lambda cancel: "memory_efficiency not judged: no full probe"
    if _every_core(ctx):  # no idle core to run it beside training
        return lambda cancel: f"full probe left to the judge: {ctx.cfg.training.ranks} ranks use every core"
    model_config, available = ctx.outputs["model"]["config"], ctx.deps.available_memory()
    return ctx.deps.prefetch_memory(ctx.run_dir, model_path, model_config, ctx.cfg, available=available)


def _every_core(ctx: Ctx) -> bool:
    return ctx.cfg.training.ranks >= (os.cpu_count() or 1)


def _wants_base(ctx: Ctx) -> bool:
    return any(ctx.wants(g) for g in ("model_learning", "artifacts", "forgetting"))


def _beside_training(
    ctx: Ctx, model_path: Path, probe: Callable[[bool], str] | None, *, trained: bool = False
) -> Callable[[bool], str] | None:
    """The base model's learning measurement (the adapter does not change it), made on the core training
    leaves idle once the full probe is done; when the ranks use every core, after training (trained), beside
    the judge's measurement of the adapter. None where the judge makes it."""
    if not _wants_base(ctx) or (_every_core(ctx) and not trained):
        return None
    available, weights = (
        ctx.deps.available_memory(),
        sum(f.stat().st_size for f in model_path.glob("*.safetensors")),
    )
    if (
        available is not None
        and available < ctx.outputs.get("estimate", {}).get("total_bytes", 0) + 3 * weights
    ):
        ctx.log("[train] base answers left to the judge: no room beside training")
        return None
    evaluation = ctx.command == "pipeline"  # its evaluation asks the base too
    where = "beside the judge (the ranks used every core)" if trained else "beside training"
    return ctx.deps.prefetch_base_learning(
        ctx.run_dir, model_path, after=probe, evaluation=evaluation, where=where
    )


def _beside_judge(ctx: Ctx, model_path: Path) -> Callable[[bool], str] | None:
    """The ranks used every core, so nothing ran beside training: the base's measurement starts now, beside the
    judge's measurement of the adapter. The full probe stays the judge's: chained before the base it made the
    judge no faster (2 ranks, SmolLM2 tier 2: judge 32.1 s vs 31.7 s; both in the judge, 39.8 s)."""
    return _beside_training(ctx, model_path, None, trained=True)


def _in_memory_hook(ctx: Ctx, model_path: Path, data_dir: Path) -> Callable | None:
    """The trained in-memory model's answers to the probes, for the artifacts gate; `finetune train` records
    them too: `validate` judges it later."""
    from finetune.data.templates import get_template
    from finetune.evaluate.budget import answer_budget
    from finetune.evaluate.run_measurements import probe_questions, record_in_memory

    if "artifacts" in ctx.cfg.gates.skip:
        return None
    tokenizer = ctx.deps.load_tokenizer(model_path)
    stops = get_template(ctx.cfg.data.template, tokenizer=tokenizer).stop_strings
    probes = probe_questions(data_dir, ctx.cfg.gates.learning_probes)
    return record_in_memory(ctx.run_dir, probes, stops, answer_budget(data_dir, tokenizer).tokens)


def stage_train(ctx: Ctx) -> StageReport:
    run_dir, key = ctx.run_dir, _train_key(ctx)
    resume = _resumable(ctx, key)
    _clear(run_dir, REMADE if resume else TRAIN_OUTPUTS)  # a resume makes the adapter again, from checkpoints
    atomic_write_text(run_dir / TRAIN_KEY, key + "\n")
    model_path, data_dir = Path(ctx.outputs["model"]["path"]), Path(ctx.outputs["data"]["data_dir"])
    hook = _in_memory_hook(ctx, model_path, data_dir)
    ctx.log(ctx.deps.describe_machine())
    probe = _prefetch_full_peak(ctx, model_path)
    base = _beside_training(ctx, model_path, probe)
    try:
        result = ctx.deps.train(
            ctx.cfg, model_path, data_dir, run_dir, resume=resume, on_trained=hook, log=ctx.log
        )
    except BaseException:
        (base or probe)(True)  # nothing outlives the training it ran beside
        raise
    prefetched = probe(False)
    if base is not None:  # the judge waits for it once it has measured the saved adapter
        prefetched += "; base answers being measured beside (the judge waits for them)"
    elif _every_core(ctx) and (base := _beside_judge(ctx, model_path)) is not None:  # the cores are free now
        prefetched += "; base answers being measured beside the judge (the ranks used every core)"
    if base is not None:
        ctx.beside[BASE_LEARNING] = base
    ctx.log(f"[train] {prefetched}")
    keep = (
        "steps",
        "start_step",
        "stopped_early",
        "final_train_loss",
        "initial_val_loss",
        "best_val_loss",
        "wall_time_s",
        "peak_memory_bytes",
        "trainable_params",
        "total_params",
        "extra",
    )
    summary = result.to_dict() if hasattr(result, "to_dict") else {}
    details = {
        "resumed": resume,
        **{k: summary[k] for k in keep if k in summary},
        "beside_training": prefetched,
    }
    if not (run_dir / ADAPTER_DIR).is_dir():
        raise StageError(f"training returned without writing {run_dir / ADAPTER_DIR}", details)
    atomic_write_json(run_dir / TRAIN_KEPT, _kept(run_dir))
    arts = [artifact(name, run_dir / path) for name, path in TRAIN_ARTIFACTS if (run_dir / path).exists()]
    return StageReport(
        outputs={
            "adapter_dir": str(run_dir / ADAPTER_DIR),
            "steps": summary.get("steps"),
            "peak_memory_bytes": summary.get("peak_memory_bytes"),  # the memory gate's LoRA side
        },
        artifacts=arts,
        details=details,
    )


MODEL = Stage("model", stage_model, lambda ctx: {"model": ctx.cfg.model.name})
DATA = Stage("data", stage_data, lambda ctx: {**ctx.section("data"), **ctx.upstream("model")})
ESTIMATE = Stage(
    "estimate",
    stage_estimate,
    lambda ctx: {**ctx.section("data", "lora", "training"), **ctx.upstream("model")},
)
TRAIN = Stage(
    "train",
    stage_train,
    lambda ctx: {**ctx.section("data", "lora", "training"), **ctx.upstream("model", "data")},
)
