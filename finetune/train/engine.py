"""The training engine: mlx-lm's tuner `train()` with our loss, batches and callback (finetune.train.callback).

Reads the prepared data (never prepares it), writes metrics, checkpoints and adapters into the run
directory atomically, and stops cleanly on a signal. The run directory's config.yaml is the tier's to write.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.tuner.trainer import TrainingArgs
from mlx_lm.tuner.trainer import train as mlx_train

from finetune.config.schema import RunConfig
from finetune.system import signals
from finetune.system.atomic import atomic_write_json
from finetune.train import shortcuts
from finetune.train.batches import TOKENS, load_split, record_tokens
from finetune.train.callback import EarlyStop, RunCallback, step_seed
from finetune.train.checkpoints import (
    ADAPTER_DIR,
    BEST_DIR,
    INIT_DIR,
    latest_checkpoint,
    restore_checkpoint,
    save_adapter,
    save_checkpoint,
    save_final_adapter,
)
from finetune.train.gemma_scale import exact_embed_scale
from finetune.train.metrics import METRICS, truncate_metrics
from finetune.train.setup import make_optimizer, prepare_model
from finetune.train.shortcut_plan import enabled_shortcuts

RESULT = "train_result.json"


@dataclass
class TrainResult:
    run_dir: str
    adapter_dir: str
    best_adapter_dir: str | None
    steps: int
    start_step: int
    stopped_early: bool = False
    interrupted: str | None = None  # the signal's name when a signal stopped training
    initial_val_loss: float | None = None
    best_val_loss: float | None = None
    final_train_loss: float | None = None
    peak_memory_bytes: int = 0
    wall_time_s: float = 0.0
    trainable_params: int = 0
    total_params: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


# ---------------------------------------------------------------- the run


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
) -> TrainResult:
    """Train per `cfg` on the prepared splits in data_dir; everything lands in run_dir.

    `load` and `train_fn` are injectable for tests. `on_trained(model, tokenizer)` sees the trained model
    still in memory (the artifacts gate later compares the saved adapter's answers with its answers).
    A signal stops training at the next step boundary with a checkpoint and re-raises signals.Interrupted.
    """
    if load is None:
        from mlx_lm import load
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    t = cfg.training
    mx.random.seed(t.seed)
    model, tokenizer = load(str(model_path))
    exact_embed_scale(model)  # train what llama.cpp and Ollama will run (finetune.train.gemma_scale)
    acfg = prepare_model(model, cfg)
    optimizer = make_optimizer(cfg)
    train_set = load_split(
        Path(data_dir) / "train.jsonl", tokenizer, cfg.data.max_seq_length, cfg.data.mask_prompt
    )
    valid = Path(data_dir) / "valid.jsonl"
    val_set = (
        load_split(valid, tokenizer, cfg.data.max_seq_length, cfg.data.mask_prompt)
        if valid.exists()
        else None
    )

    start_step, state = 0, {}
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        state = restore_checkpoint(ckpt, model, optimizer)
        start_step = state["step"]
        log(f"resuming from {ckpt} (step {start_step})")
    elif not resume:
        (run_dir / METRICS).unlink(missing_ok=True)
    fast = shortcuts.setup(model, seed=t.seed, max_seq_length=cfg.data.max_seq_length, train_set=train_set,
                           val_set=val_set, start_batch=start_step, cfg=cfg, enable=enabled_shortcuts(cfg))  # fmt: skip
    log(fast.plan.summary())
    truncate_metrics(run_dir / METRICS, start_step)
    if start_step == 0:
        save_adapter(model, acfg, run_dir / INIT_DIR)  # the parameter-update gate compares against this
        record_tokens(train_set, run_dir / TOKENS)  # what the label-mask gate checks
    mx.random.seed(step_seed(t.seed, start_step))

    cb = RunCallback(
        run_dir=run_dir, cfg=cfg, model=model, optimizer=optimizer, acfg=acfg, val_set=val_set,
        iterate=fast.iterate_eval, loss=fast.loss, start_step=start_step, state=state,
    )  # fmt: skip
    n_trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    n_total = sum(v.size for _, v in tree_flatten(model.parameters()))
    if n_trainable == 0:
        raise ValueError("no trainable parameters: every adapter and weight is frozen")
    result = TrainResult(str(run_dir), str(run_dir / ADAPTER_DIR), None, start_step, start_step)
    result.extra["shortcuts"] = fast.plan.summary()
    result.trainable_params, result.total_params = n_trainable, n_total
    mx.reset_peak_memory()
    tic = time.perf_counter()
    interrupted: BaseException | None = None
    try:
        with signals.deferred():
            if start_step == 0:
                model.train()
                result.initial_val_loss = cb.evaluate()
                cb.bad_evals = 0
            remaining = t.iters - start_step
            if remaining > 0:
                args = TrainingArgs(
                    batch_size=t.batch_size,
                    iters=remaining,
                    steps_per_report=1,
                    steps_per_eval=remaining + 1,
                    steps_per_save=remaining + 1,
                    max_seq_length=cfg.data.max_seq_length,
                    adapter_file=str(run_dir / ".mlx_lm_final.safetensors"),
                    grad_checkpoint=t.grad_checkpoint,
                    grad_accumulation_steps=t.grad_accumulation_steps,
                )
                train_fn(model, optimizer, train_set, None, args=args, loss=fast.loss,
                         iterate_batches=fast.iterate_train, training_callback=cb)  # fmt: skip
            signals.check()  # a signal that came after the last step boundary
    except EarlyStop as why:
        result.stopped_early = True
        log(f"early stopping at step {cb.step}: {why}")
    except (signals.Interrupted, KeyboardInterrupt) as exc:
        interrupted = exc
        if isinstance(exc, KeyboardInterrupt):  # no handlers here: it may have landed anywhere in a step
            done = (
                int(optimizer.state["step"].item()) * t.grad_accumulation_steps
                if "step" in optimizer.state
                else 0
            )
            if done > cb.step and not cb.step_back():
                cb.step = (
                    done  # full fine-tuning keeps no snapshot: resume after the update, its loss unlogged
                )
            save_checkpoint(run_dir, cb.step, model, optimizer, acfg, cb.state())
        result.interrupted = signals.as_interrupted(exc).name
        log(f"interrupted ({result.interrupted}): resumable checkpoint at step {cb.step}")
    finally:
        cb.close()
        (run_dir / ".mlx_lm_final.safetensors").unlink(missing_ok=True)
    result.steps = cb.step
    result.wall_time_s = time.perf_counter() - tic
    result.peak_memory_bytes = int(mx.get_peak_memory())
    result.best_val_loss, result.final_train_loss = cb.best_val, cb.last_train_loss
    if interrupted is not None:
        atomic_write_json(run_dir / RESULT, result.to_dict())
        raise interrupted
    save_final_adapter(model, acfg, run_dir / ADAPTER_DIR)
    if (run_dir / BEST_DIR).exists():
        result.best_adapter_dir = str(run_dir / BEST_DIR)
    if on_trained is not None:
        on_trained(model, tokenizer)
    atomic_write_json(run_dir / RESULT, result.to_dict())
    return result
