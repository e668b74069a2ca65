"""The commands, each a recipe read top to bottom: the stages it runs, in order, and the gates it requires.

A stage is replayed when its inputs and artifacts are unchanged (finetune.stages.runner); after a failed
stage the later ones are not run. What a stage does is in finetune/stages/, what it calls in `Deps`;
`options` are open_run's keywords (log, settings, heartbeat_s).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.config.schema import RunConfig
from finetune.gates.registry import PIPELINE_GATES, TRAINING_GATES
from finetune.recipes.execution import Command, Finished, open_run
from finetune.stages.context import Deps
from finetune.stages.judge import JUDGE
from finetune.stages.shipping import EVALUATE, FUSE, GGUF, OLLAMA
from finetune.stages.training import DATA, ESTIMATE, MODEL, TRAIN

TRAIN_ONLY = Command("train", gates=(), judged=False)
RUN = Command("run", gates=TRAINING_GATES)
VALIDATE = Command("validate", gates=TRAINING_GATES)
PIPELINE = Command("pipeline", gates=PIPELINE_GATES)


def train(cfg: RunConfig, run_dir: Path, deps: Deps, **options: Any) -> Finished:
    """`finetune train`: prepare and train; never judged, so its best status is "not_judged"."""
    with open_run(TRAIN_ONLY, cfg, run_dir, deps, **options) as r:
        r.stage(MODEL)  # resolve the base model into the cache
        r.stage(DATA)  # the user's rows -> train/valid/test.jsonl
        r.stage(TRAIN)  # LoRA with mlx-lm's train(): adapter, checkpoints, metrics
    return r.finished


def run(cfg: RunConfig, run_dir: Path, deps: Deps, **options: Any) -> Finished:
    """`finetune run` (tiers 1 and 2): train, then judge the saved run with the training gates."""
    with open_run(RUN, cfg, run_dir, deps, **options) as r:
        r.stage(MODEL)
        r.stage(DATA)
        r.stage(ESTIMATE)  # predicted memory, before any is spent
        r.stage(TRAIN)
        r.stage(JUDGE)  # loss, learning, artifacts, parameters, label mask, memory: from disk
    return r.finished


def validate(cfg: RunConfig, run_dir: Path, deps: Deps, **options: Any) -> Finished:
    """`finetune validate RUN`: judge a finished run again, in a fresh process, from what it saved."""
    with open_run(VALIDATE, cfg, run_dir, deps, force=("judge",), **options) as r:
        r.stage(MODEL)
        r.stage(JUDGE)
    return r.finished


def pipeline(cfg: RunConfig, run_dir: Path, deps: Deps, **options: Any) -> Finished:
    """`finetune pipeline` (tier 3): LoRA -> fuse -> GGUF -> Ollama -> the same questions in every runtime, then
    the other forms the config ships (quantized GGUFs, adapters)."""
    if options.get("settings") is None:
        from finetune.evaluate.evaluation import EvalSettings

        options["settings"] = EvalSettings()
    from dataclasses import replace

    from finetune.stages.forms import SHIP, form_gates

    # what it ships besides the judged GGUF is judged too, or the run is not green
    command = replace(PIPELINE, gates=PIPELINE_GATES + form_gates(cfg))
    with open_run(command, cfg, run_dir, deps, **options) as r:
        r.stage(MODEL)
        r.stage(DATA)
        r.stage(TRAIN)
        r.stage(JUDGE)
        r.stage(FUSE)  # the adapter merged into a float32 copy of the base; fuse_exactness
        r.stage(GGUF)  # llama.cpp's own converter; the file checked against the fused config
        r.stage(OLLAMA)  # a private server: create from the Modelfile, served checks
        r.stage(EVALUATE)  # adapter, fused, GGUF (llama.cpp) and Ollama answer the same questions
        if cfg.export.forms():
            r.stage(SHIP)  # export.adapters and export.gguf_types, each judged where users load it
    return r.finished


RECIPES = {"train": train, "run": run, "validate": validate, "pipeline": pipeline}
COMMANDS = {c.name: c for c in (TRAIN_ONLY, RUN, VALIDATE, PIPELINE)}
