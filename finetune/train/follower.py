"""A rank other than 0 of a data-parallel training: it waits for rank 0's job, builds its own inputs, trains.

Rank 0 sends the config and its resume checkpoint (finetune.train.distributed.send_job). This rank resolves
the model and prepares the data itself, in a private temporary folder (on another machine rank 0's files are
not there; on the same machine it still writes nothing of rank 0's), restores the checkpoint there, and trains
its shard; the digest check before step 1 refuses it if its model, data or code differ from rank 0's.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from pathlib import Path

from finetune.config.schema import RunConfig
from finetune.train import distributed
from finetune.train.checkpoints import CHECKPOINTS


def follow(
    world: distributed.World,
    train_run: Callable,
    *,
    resolve: Callable | None = None,
    prepare: Callable | None = None,
) -> int:
    """Train as rank `world.rank` whatever rank 0 sends; 0 when done or when rank 0 had nothing to train."""
    job = distributed.receive_job(world)
    if job is None:
        return 0
    cfg = RunConfig.model_validate(job["config"])
    resolve, prepare = resolve or _resolve, prepare or _prepare
    with tempfile.TemporaryDirectory(prefix=f"finetune-rank{world.rank}-") as tmp:
        model_path = resolve(cfg)
        data_dir = prepare(cfg, model_path, Path(tmp) / "data")
        run_dir = Path(tmp) / "run"
        if job["checkpoint"]:
            ckpt = run_dir / CHECKPOINTS / job["checkpoint"]
            ckpt.mkdir(parents=True)
            for name, hexed in job["files"].items():
                (ckpt / name).write_bytes(bytes.fromhex(hexed))
        run_dir.mkdir(exist_ok=True)
        train_run(cfg, model_path, data_dir, run_dir, resume=bool(job["checkpoint"]), log=lambda _: None,
                  world=world)  # fmt: skip
    return 0


def _resolve(cfg: RunConfig) -> Path:
    from finetune.models.resolve import resolve_model

    return Path(resolve_model(cfg.model.name).path)


def _prepare(cfg: RunConfig, model_path: Path, out: Path) -> Path:
    from finetune.data.prepare import prepare_for_run
    from finetune.models.tokenizer import load_tokenizer

    prepare_for_run(cfg.data, out, load_tokenizer(model_path))
    return out
