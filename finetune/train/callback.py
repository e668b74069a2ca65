"""The training callback: everything mlx-lm's loop does not do, on FineTune's global step count.

Per-step metrics, evaluation, checkpoints (adapter + optimizer + step), the best-validation adapter, early
stopping, and stopping on a signal at the next step boundary with a checkpoint that resumes exactly.
"""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map, tree_unflatten
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.trainer import evaluate

from finetune.system import signals
from finetune.train import distributed
from finetune.train.checkpoints import BEST_DIR, save_adapter, save_checkpoint
from finetune.train.metrics import METRICS


class EarlyStop(Exception):  # noqa: N818 - control flow out of mlx-lm's loop, not an error
    """Raised from the callback to leave mlx-lm's loop when validation stops improving."""


def step_seed(seed: int, step: int) -> int:
    # MLX cannot restore an arbitrary RNG key, so we reseed per step: any resume point is then exact.
    return (seed * 1_000_003 + step) % (2**31)


class RunCallback(TrainingCallback):
    """Metrics, evaluation, checkpoints, best adapter, early stopping and signals, on global steps."""

    def __init__(
        self,
        *,
        run_dir: Path,
        cfg: Any,
        model,
        optimizer,
        acfg: dict,
        val_set,
        iterate: Callable,
        loss: Callable,
        start_step: int,
        state: dict,
        world: distributed.World = distributed.SINGLE,
    ) -> None:
        self.run_dir, self.cfg, self.model, self.optimizer = run_dir, cfg, model, optimizer
        self.world, self.writer = world, world.writer  # in a data-parallel run only rank 0 writes
        self.acfg, self.val_set, self.iterate, self.loss = acfg, val_set, iterate, loss
        self.step = start_step
        self.best_val = state.get("best_val")
        self.bad_evals = state.get("bad_evals", 0)
        self.last_train_loss = state.get("last_train_loss")
        # closed by close(); a rank other than 0 writes nothing
        self.metrics = open(run_dir / METRICS, "a", encoding="utf-8") if self.writer else None  # noqa: SIM115
        # The trainable weights and optimizer state as of the last reported step: references, not copies
        # (MLX arrays are immutable), so an interrupt between an update and its report can step back.
        self.snapshot = None if cfg.training.fine_tune_type == "full" else self._take()

    def _take(self) -> tuple:
        return dict(tree_flatten(self.model.trainable_parameters())), tree_map(
            lambda x: x, self.optimizer.state
        )

    def step_back(self) -> bool:
        """Undo an update that was never reported (weights and optimizer back to self.step); False if impossible."""
        if self.snapshot is None:
            return False
        params, state = self.snapshot
        self.model.update(tree_unflatten(list(params.items())))
        self.optimizer.state = state
        return True

    def close(self) -> None:
        if self.metrics is not None:
            self.metrics.close()

    def _write(self, row: dict) -> None:
        if self.metrics is not None:
            self.metrics.write(json.dumps(row) + "\n")
            self.metrics.flush()

    def state(self) -> dict:
        return {
            "best_val": self.best_val,
            "bad_evals": self.bad_evals,
            "last_train_loss": self.last_train_loss,
        }

    def checkpoint(self) -> Path | None:
        if not self.writer:
            return None
        return save_checkpoint(self.run_dir, self.step, self.model, self.optimizer, self.acfg, self.state())

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
            loss=self.loss,
            iterate_batches=self.iterate,
        )
        self.model.train()
        self._write(
            {"kind": "val", "step": self.step, "val_loss": val, "val_time": time.perf_counter() - tic}
        )
        if self.best_val is None or val < self.best_val:
            self.best_val, self.bad_evals = val, 0
            if self.writer:
                save_adapter(self.model, self.acfg, self.run_dir / BEST_DIR)
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
        at_update = self.step % t.grad_accumulation_steps == 0  # optimizer state is consistent only here
        if at_update and self.step % t.save_every == 0:
            self.checkpoint()
        distributed.beat(self.world, f"step {self.step}")
        if (
            at_update
            and self.step < t.iters
            and distributed.stop_requested(self.world, signals.pending() is not None)
        ):
            self.checkpoint()  # stop on the signal with a checkpoint this exact step resumes from
            signals.check()
            raise signals.Interrupted(signal.SIGTERM)  # another rank was signalled: all stop at this step
        if self.snapshot is not None:
            self.snapshot = self._take()
        if t.early_stopping_patience and self.bad_evals >= t.early_stopping_patience:
            raise EarlyStop(f"no better val loss in {self.bad_evals} evaluations")
