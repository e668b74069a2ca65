"""The training engine: mlx-lm's tuner `train()` with our loss, batches and callback.

The callback owns everything mlx-lm's loop does not: per-step metrics, evaluation on a global-step
cadence, checkpoints (adapter + optimizer + step), the best-validation adapter, early stopping and
Ctrl-C. Every file is written atomically, so a crash never leaves half an adapter.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import mlx.core as mx
import mlx.optimizers as optim
from mlx.utils import tree_flatten, tree_unflatten
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.trainer import TrainingArgs, evaluate
from mlx_lm.tuner.trainer import train as mlx_train
from mlx_lm.tuner.utils import linear_to_lora_layers

from finetune.atomic import atomic_dir, atomic_write_json, atomic_write_text
from finetune.batches import load_split, make_iterate_batches, masked_loss
from finetune.config import RunConfig, save_config
from finetune.validate import read_metrics

CHECKPOINTS = "checkpoints"
ADAPTER_DIR = "adapter"
BEST_DIR = "adapter_best"


class EarlyStop(Exception):
    """Raised from the callback to leave mlx-lm's loop when validation stops improving."""


@dataclass
class TrainResult:
    run_dir: str
    adapter_dir: str
    best_adapter_dir: str | None
    steps: int
    start_step: int
    stopped_early: bool = False
    interrupted: bool = False
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


# ---------------------------------------------------------------- model set-up


def adapter_config(cfg: RunConfig, n_layers: int) -> dict[str, Any]:
    """What mlx_lm.load(..., adapter_path=) and fuse need beside the weights."""
    # Like mlx-lm, a count above the model's depth means every block (quick's 8 on a 2-layer test model).
    full_depth = cfg.lora.num_layers == -1 or cfg.training.fine_tune_type == "full"
    num_layers = n_layers if full_depth else min(cfg.lora.num_layers, n_layers)
    params = {"rank": cfg.lora.rank, "scale": cfg.lora.scale, "dropout": cfg.lora.dropout}
    if cfg.lora.keys:
        params["keys"] = list(cfg.lora.keys)
    return {
        "fine_tune_type": cfg.training.fine_tune_type,
        "num_layers": num_layers,
        "lora_parameters": params,
    }


def prepare_model(model, cfg: RunConfig) -> dict[str, Any]:
    """Freeze the base and add adapters (lora/dora), or unfreeze everything (full)."""
    n_layers = len(model.layers)
    acfg = adapter_config(cfg, n_layers)
    model.freeze()
    if cfg.training.fine_tune_type == "full":
        model.unfreeze()
    else:
        linear_to_lora_layers(
            model, acfg["num_layers"], acfg["lora_parameters"], use_dora=cfg.training.fine_tune_type == "dora"
        )
    return acfg


def make_optimizer(cfg: RunConfig) -> optim.Optimizer:
    t = cfg.training
    lr: Any = t.learning_rate
    if t.lr_schedule == "cosine":
        lr = optim.cosine_decay(t.learning_rate, max(1, t.iters - t.warmup_steps))
    elif t.lr_schedule == "linear":
        lr = optim.linear_schedule(t.learning_rate, 0.0, max(1, t.iters - t.warmup_steps))
    if t.warmup_steps:
        warm = optim.linear_schedule(0.0, t.learning_rate, t.warmup_steps)
        rest = lr if callable(lr) else (lambda _step, v=lr: v)
        lr = optim.join_schedules([warm, rest], [t.warmup_steps])
    if t.optimizer == "adamw":
        return optim.AdamW(learning_rate=lr, weight_decay=t.weight_decay)
    if t.optimizer == "sgd":
        return optim.SGD(learning_rate=lr, weight_decay=t.weight_decay)
    return optim.Adam(learning_rate=lr)


def step_seed(seed: int, step: int) -> int:
    # MLX cannot restore an arbitrary RNG key, so we reseed per step: any resume point is then exact.
    return (seed * 1_000_003 + step) % (2**31)


# ---------------------------------------------------------------- checkpoints


def _save_adapter(model, acfg: dict, out: Path) -> None:
    weights = dict(tree_flatten(model.trainable_parameters()))
    with atomic_dir(out) as tmp:
        mx.save_safetensors(str(tmp / "adapters.safetensors"), weights)
        (tmp / "adapter_config.json").write_text(json.dumps(acfg, indent=2))


def save_checkpoint(run_dir: Path, step: int, model, optimizer, acfg: dict, state: dict) -> Path:
    out = run_dir / CHECKPOINTS / f"step-{step:07d}"
    with atomic_dir(out) as tmp:
        mx.save_safetensors(
            str(tmp / "adapters.safetensors"), dict(tree_flatten(model.trainable_parameters()))
        )
        mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
        (tmp / "adapter_config.json").write_text(json.dumps(acfg, indent=2))
        (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    return out


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / CHECKPOINTS).glob("step-*[0-9]"))
    return found[-1] if found else None


def restore_checkpoint(ckpt: Path, model, optimizer) -> dict:
    model.load_weights(list(mx.load(str(ckpt / "adapters.safetensors")).items()), strict=False)
    optimizer.state = tree_unflatten(list(mx.load(str(ckpt / "optimizer.safetensors")).items()))
    optimizer.init(model.trainable_parameters())
    return json.loads((ckpt / "state.json").read_text())


def _truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics past the resume point so a resumed run's log equals an uninterrupted one."""
    if not path.exists():
        return
    kept = [
        json.dumps(row)
        for row in read_metrics(path)  # skips a torn last line from a crash
        if row.get("step", 0) <= step and not (row.get("kind") == "val" and row.get("step") == step)
    ]
    atomic_write_text(path, "".join(line + "\n" for line in kept))


# ---------------------------------------------------------------- the callback


class RunCallback(TrainingCallback):
    """Metrics, evaluation, checkpoints, best adapter and early stopping, on global steps."""

    def __init__(self, *, run_dir, cfg, model, optimizer, acfg, val_set, iterate, start_step, state):
        self.run_dir, self.cfg, self.model, self.optimizer = run_dir, cfg, model, optimizer
        self.acfg, self.val_set, self.iterate = acfg, val_set, iterate
        self.step = start_step
        self.best_val = state.get("best_val")
        self.bad_evals = state.get("bad_evals", 0)
        self.last_train_loss = state.get("last_train_loss")
        self.metrics = open(run_dir / "metrics.jsonl", "a", encoding="utf-8")  # noqa: SIM115

    def close(self) -> None:
        self.metrics.close()

    def _write(self, row: dict) -> None:
        self.metrics.write(json.dumps(row) + "\n")
        self.metrics.flush()

    def state(self) -> dict:
        return {
            "best_val": self.best_val,
            "bad_evals": self.bad_evals,
            "last_train_loss": self.last_train_loss,
        }

    def evaluate(self) -> float | None:
        if self.val_set is None:
            return None
        tic = time.perf_counter()
        val = evaluate(
            self.model,
            self.val_set,
            batch_size=self.cfg.training.batch_size,
            num_batches=self.cfg.training.val_batches,
            max_seq_length=self.cfg.data.max_seq_length,
            loss=masked_loss,
            iterate_batches=self.iterate,
        )
        self.model.train()
        self._write(
            {"kind": "val", "step": self.step, "val_loss": val, "val_time": time.perf_counter() - tic}
        )
        if self.best_val is None or val < self.best_val:
            self.best_val, self.bad_evals = val, 0
            _save_adapter(self.model, self.acfg, self.run_dir / BEST_DIR)
        else:
            self.bad_evals += 1
        return val

    def on_train_loss_report(self, info: dict) -> None:
        self.step += 1
        self.last_train_loss = info["train_loss"]
        self._write(
            {
                "kind": "train",
                "step": self.step,
                "train_loss": info["train_loss"],
                "learning_rate": info["learning_rate"],
                "tokens_per_second": info["tokens_per_second"],
                "trained_tokens": info["trained_tokens"],
                "peak_memory_bytes": int(mx.get_peak_memory()),
                "time": time.time(),
            }
        )
        mx.random.seed(step_seed(self.cfg.training.seed, self.step))
        t = self.cfg.training
        if self.step % t.eval_every == 0 or self.step == t.iters:
            self.evaluate()
        if self.step % t.save_every == 0 and self.step % t.grad_accumulation_steps == 0:
            save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.acfg, self.state())
        if t.early_stopping_patience and self.bad_evals >= t.early_stopping_patience:
            raise EarlyStop(f"no better val loss in {self.bad_evals} evaluations")


# ---------------------------------------------------------------- the run


def train_run(
    cfg: RunConfig,
    model_path: Path,
    data_dir: Path,
    run_dir: Path,
    *,
    resume: bool = False,
    load=None,
    train_fn=mlx_train,
    on_ready=None,
    log=print,
) -> TrainResult:
    """Train per `cfg`; everything lands in `run_dir`.

    `load` and `train_fn` are injectable for tests; `on_ready(model)` sees the model with adapters
    attached before the first step, and the same object is trained in place (gates snapshot it).
    """
    if load is None:
        from mlx_lm import load
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    t = cfg.training
    mx.random.seed(t.seed)
    model, tokenizer = load(str(model_path))
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
        (run_dir / "metrics.jsonl").unlink(missing_ok=True)
    _truncate_metrics(run_dir / "metrics.jsonl", start_step)
    if on_ready is not None:
        on_ready(model)
    mx.random.seed(step_seed(t.seed, start_step))

    iterate = make_iterate_batches(t.seed, start_batch=start_step)
    cb = RunCallback(
        run_dir=run_dir, cfg=cfg, model=model, optimizer=optimizer, acfg=acfg, val_set=val_set,
        iterate=make_iterate_batches(t.seed), start_step=start_step, state=state,
    )  # fmt: skip
    n_trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    n_total = sum(v.size for _, v in tree_flatten(model.parameters()))
    if n_trainable == 0:
        raise ValueError("no trainable parameters: every adapter and weight is frozen")
    result = TrainResult(str(run_dir), str(run_dir / ADAPTER_DIR), None, start_step, start_step)
    result.trainable_params, result.total_params = n_trainable, n_total
    mx.reset_peak_memory()
    tic = time.perf_counter()
    try:
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
            train_fn(model, optimizer, train_set, None, args=args, loss=masked_loss, iterate_batches=iterate,
                     training_callback=cb)  # fmt: skip
    except EarlyStop as why:
        result.stopped_early = True
        log(f"early stopping at step {cb.step}: {why}")
    except KeyboardInterrupt:
        # The optimizer's own counter is the truth: the callback may not have run for the last step.
        done = (
            int(optimizer.state["step"].item()) * t.grad_accumulation_steps
            if "step" in optimizer.state
            else 0
        )
        cb.step = max(start_step, done)
        save_checkpoint(run_dir, cb.step, model, optimizer, acfg, cb.state())
        result.interrupted = True
        log(f"interrupted: resumable checkpoint at step {cb.step}; rerun with --resume")
    finally:
        cb.close()
        (run_dir / ".mlx_lm_final.safetensors").unlink(missing_ok=True)
    result.steps = cb.step
    result.wall_time_s = time.perf_counter() - tic
    result.peak_memory_bytes = int(mx.get_peak_memory())
    result.best_val_loss, result.final_train_loss = cb.best_val, cb.last_train_loss
    _save_adapter(model, acfg, run_dir / ADAPTER_DIR)
    if (run_dir / BEST_DIR).exists():
        result.best_adapter_dir = str(run_dir / BEST_DIR)
    atomic_write_json(run_dir / "train_result.json", result.to_dict())
    return result
