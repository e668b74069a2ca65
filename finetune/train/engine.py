"""The training engine: mlx-lm's tuner `train()` with our loss, batches and callback (finetune.train.callback).

Reads the prepared data (never prepares it), writes metrics, checkpoints and adapters into the run
directory atomically, and stops cleanly on a signal. The run directory's config.yaml is the tier's to write.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.tuner.trainer import TrainingArgs
from mlx_lm.tuner.trainer import train as mlx_train

from finetune.config.schema import RunConfig
from finetune.system import signals
from finetune.system.atomic import atomic_write_json
from finetune.system.hashing import dir_manifest, json_sha256
from finetune.system.mlx_peak import reset_peak
from finetune.train import distributed, shortcuts
from finetune.train.callback import EarlyStop, RunCallback, step_seed
from finetune.train.checkpoints import (
    ADAPTER_DIR,
    BEST_DIR,
    INIT_DIR,
    RESULT,
    latest_checkpoint,
    restore_checkpoint,
    save_adapter,
    save_checkpoint,
    save_final_adapter,
)
from finetune.train.gemma_scale import exact_embed_scale
from finetune.train.metrics import METRICS, read_metrics, truncate_metrics, val_losses
from finetune.train.result import TrainResult
from finetune.train.setup import make_optimizer, prepare_model
from finetune.train.shortcut_plan import enabled_shortcuts
from finetune.train.splits import TOKENS, load_split, record_tokens

FINAL_MLX_ADAPTER = ".mlx_lm_final.safetensors"  # mlx-lm saves here at its end; deleted, ours is ADAPTER_DIR


# ---------------------------------------------------------------- the run


@dataclass
class _Loaded:
    """The model with its adapters and optimizer, and the tokenized splits: what every phase of a run uses."""

    model: Any
    tokenizer: Any
    acfg: Any
    optimizer: Any
    train_set: Any
    val_set: Any


def train_run(
    cfg: RunConfig,
    model_path: Path,
    data_dir: Path,
    run_dir: Path,
    *,
    resume: bool = False,
    load: Callable | None = None,
    train_fn: Callable = mlx_train,
    on_trained: Callable[[Any, Any], None] | None = None,
    log: Callable[[str], None] = print,
    world: distributed.World = distributed.SINGLE,
) -> TrainResult:
    """Train per `cfg` on the prepared splits in data_dir; everything lands in run_dir.

    `load` and `train_fn` are injectable for tests. `on_trained(model, tokenizer)` sees the trained model
    still in memory (the artifacts gate later compares the saved adapter's answers with its answers).
    A signal stops training at the next step boundary with a checkpoint and re-raises signals.Interrupted.
    In a data-parallel `world` each rank trains on its shard of every batch and only rank 0 writes.
    """
    run_dir = Path(run_dir)
    run, fast, cb, result = _prepare(cfg, Path(model_path), Path(data_dir), run_dir, resume, load, log, world)
    remaining = cfg.training.iters - result.start_step
    tic = time.perf_counter()
    try:
        with signals.deferred():
            if result.start_step == 0:
                result.initial_val_loss = _first_evaluation(run, cb)
            if remaining > 0:  # mlx-lm's loop; our callback evaluates and saves, so its own never do
                train_fn(
                    run.model,
                    run.optimizer,
                    run.train_set,
                    None,
                    args=_training_args(cfg, run_dir, remaining),
                    loss=distributed.sharded_loss(fast.loss, world) if world.sharded else fast.loss,
                    iterate_batches=fast.iterate_train,
                    training_callback=cb,
                )
            signals.check()  # a signal that came after the last step boundary
    except EarlyStop as why:
        result.stopped_early = True
        log(f"early stopping at step {cb.step}: {why}")
    except (signals.Interrupted, KeyboardInterrupt) as exc:
        _stopped(cfg, run, run_dir, cb, result, exc, tic, log, world)
        raise
    finally:
        cb.close()
        if world.writer:
            (run_dir / FINAL_MLX_ADAPTER).unlink(missing_ok=True)
    return _finished(run, run_dir, cb, result, tic, on_trained if world.writer else None)


def _prepare(
    cfg: RunConfig,
    model_path: Path,
    data_dir: Path,
    run_dir: Path,
    resume: bool,
    load: Callable | None,
    log: Callable[[str], None],
    world: distributed.World,
) -> tuple[_Loaded, shortcuts.Shortcuts, RunCallback, TrainResult]:
    """Load model and splits, restore a checkpoint or record step 0, plan the shortcuts, make the callback."""
    if load is None:
        from mlx_lm import load
    if world.writer:
        run_dir.mkdir(parents=True, exist_ok=True)
    if world.size > cfg.training.batch_size:
        raise ValueError(f"{world.size} ranks need training.batch_size >= {world.size} (each takes rows of every "
                         f"batch), got {cfg.training.batch_size}")  # fmt: skip
    if world.sharded and world.writer:  # every other rank waits for what to train (finetune.train.follower)
        distributed.send_job(world, cfg, latest_checkpoint(run_dir) if resume else None)
    distributed.agree(world, distributed.run_digest(cfg, model_path, data_dir) if world.sharded else {})
    mx.random.seed(cfg.training.seed)
    run = _load(cfg, load, model_path, data_dir)
    start_step, state = _start_point(run_dir, run, resume, log, world.writer)
    if world.sharded:  # every rank continues from the same checkpoint (several machines have several disks)
        ckpt = latest_checkpoint(run_dir) if start_step else None
        distributed.agree(
            world, {"resume point": json_sha256([start_step, dir_manifest(ckpt) if ckpt else {}])}
        )
    fast = _setup_shortcuts(cfg, run, start_step, world)
    log(fast.plan.summary())
    if world.writer:
        truncate_metrics(run_dir / METRICS, start_step)
    if start_step == 0 and world.writer:
        # the parameter-update gate compares against this
        save_adapter(run.model, run.acfg, run_dir / INIT_DIR)
        record_tokens(run.train_set, run_dir / TOKENS)  # what the label-mask gate checks
    mx.random.seed(step_seed(cfg.training.seed, start_step))
    cb = _callback(cfg, run, run_dir, fast, start_step, state, world)
    result = _new_result(run, run_dir, start_step, fast)
    if start_step > 0:  # the loss before training was measured by the run this one continues
        before = [loss for step, loss in val_losses(read_metrics(run_dir / METRICS)) if step == 0]
        result.initial_val_loss = before[0] if before else None
    reset_peak()  # the run's own peak (the memory gate's LoRA side), not garbage of what ran before in-process
    distributed.beat(world, f"ready {start_step}")
    return run, fast, cb, result


def _first_evaluation(run: _Loaded, cb: RunCallback) -> float | None:
    run.model.train()
    loss = cb.evaluate()
    cb.bad_evals = 0
    return loss


def _training_args(cfg: RunConfig, run_dir: Path, remaining: int) -> TrainingArgs:
    t = cfg.training
    return TrainingArgs(
        batch_size=t.batch_size,
        iters=remaining,
        steps_per_report=1,
        steps_per_eval=remaining + 1,
        steps_per_save=remaining + 1,
        max_seq_length=cfg.data.max_seq_length,
        adapter_file=str(run_dir / FINAL_MLX_ADAPTER),
        grad_checkpoint=t.grad_checkpoint,
        grad_accumulation_steps=t.grad_accumulation_steps,
    )


def _measured(cb: RunCallback, result: TrainResult, tic: float) -> None:
    result.steps = cb.step
    result.wall_time_s = time.perf_counter() - tic
    result.peak_memory_bytes = int(mx.get_peak_memory())
    result.best_val_loss, result.final_train_loss = cb.best_val, cb.last_train_loss


def _stopped(
    cfg: RunConfig,
    run: _Loaded,
    run_dir: Path,
    cb: RunCallback,
    result: TrainResult,
    exc: BaseException,
    tic: float,
    log: Callable[[str], None],
    world: distributed.World,
) -> None:
    """A signal stopped training: a resumable checkpoint and the result so far, before it is re-raised."""
    if not world.writer:
        return
    if isinstance(exc, KeyboardInterrupt):  # no handlers here: it may have landed anywhere in a step
        _checkpoint_mid_step(cfg, run, run_dir, cb)
    result.interrupted = signals.as_interrupted(exc).name
    log(f"interrupted ({result.interrupted}): resumable checkpoint at step {cb.step}")
    _measured(cb, result, tic)
    atomic_write_json(run_dir / RESULT, result.to_dict())


def _finished(
    run: _Loaded,
    run_dir: Path,
    cb: RunCallback,
    result: TrainResult,
    tic: float,
    on_trained: Callable[[Any, Any], None] | None,
) -> TrainResult:
    _measured(cb, result, tic)
    if not cb.writer:
        return result
    save_final_adapter(run.model, run.acfg, run_dir / ADAPTER_DIR)
    if (run_dir / BEST_DIR).exists():
        result.best_adapter_dir = str(run_dir / BEST_DIR)
    if on_trained is not None:
        on_trained(run.model, run.tokenizer)
    atomic_write_json(run_dir / RESULT, result.to_dict())
    return result


def _load(cfg: RunConfig, load: Callable, model_path: Path, data_dir: Path) -> _Loaded:
    model, tokenizer = load(str(model_path))
    exact_embed_scale(model)  # train what llama.cpp and Ollama will run (finetune.train.gemma_scale)
    acfg = prepare_model(model, cfg)
    optimizer = make_optimizer(cfg)
    max_len, mask_prompt = cfg.data.max_seq_length, cfg.data.mask_prompt
    train_set = load_split(data_dir / "train.jsonl", tokenizer, max_len, mask_prompt)
    valid = data_dir / "valid.jsonl"
    val_set = load_split(valid, tokenizer, max_len, mask_prompt) if valid.exists() else None
    return _Loaded(model, tokenizer, acfg, optimizer, train_set, val_set)


def _start_point(
    run_dir: Path, run: _Loaded, resume: bool, log: Callable[[str], None], writer: bool
) -> tuple[int, dict]:
    """The step to start from and the callback state saved with it; a fresh run drops old metrics."""
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is None:
        if not resume and writer:
            (run_dir / METRICS).unlink(missing_ok=True)
        return 0, {}
    state = restore_checkpoint(ckpt, run.model, run.optimizer)
    log(f"resuming from {ckpt} (step {state['step']})")
    return state["step"], state


def _setup_shortcuts(
    cfg: RunConfig, run: _Loaded, start_step: int, world: distributed.World
) -> shortcuts.Shortcuts:
    return shortcuts.setup(
        run.model,
        seed=cfg.training.seed,
        max_seq_length=cfg.data.max_seq_length,
        train_set=run.train_set,
        val_set=run.val_set,
        start_batch=start_step,
        cfg=cfg,
        enable=enabled_shortcuts(cfg),
        world=world,
    )


def _callback(
    cfg: RunConfig,
    run: _Loaded,
    run_dir: Path,
    fast: shortcuts.Shortcuts,
    start_step: int,
    state: dict,
    world: distributed.World,
) -> RunCallback:
    return RunCallback(
        run_dir=run_dir,
        cfg=cfg,
        model=run.model,
        optimizer=run.optimizer,
        acfg=run.acfg,
        val_set=run.val_set,
        iterate=fast.iterate_eval,
        loss=fast.loss,
        start_step=start_step,
        state=state,
        world=world,
    )


def _new_result(run: _Loaded, run_dir: Path, start_step: int, fast: shortcuts.Shortcuts) -> TrainResult:
    n_trainable = sum(v.size for _, v in tree_flatten(run.model.trainable_parameters()))
    n_total = sum(v.size for _, v in tree_flatten(run.model.parameters()))
    if n_trainable == 0:
        raise ValueError("no trainable parameters: every adapter and weight is frozen")
    result = TrainResult(str(run_dir), str(run_dir / ADAPTER_DIR), None, start_step, start_step)
    result.extra["shortcuts"] = fast.plan.summary()
    result.trainable_params, result.total_params = n_trainable, n_total
    return result


def _checkpoint_mid_step(cfg: RunConfig, run: _Loaded, run_dir: Path, cb: RunCallback) -> None:
    """Checkpoint after a Ctrl-C that may have landed between an update and its report."""
    optimizer = run.optimizer
    accumulation = cfg.training.grad_accumulation_steps
    done = int(optimizer.state["step"].item()) * accumulation if "step" in optimizer.state else 0
    if done > cb.step and not cb.step_back():
        cb.step = done  # full fine-tuning keeps no snapshot: resume after the update, its loss unlogged
    save_checkpoint(run_dir, cb.step, run.model, optimizer, run.acfg, cb.state())
