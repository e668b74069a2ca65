"""Adapters and checkpoints on disk: adapter/ (last), adapter_best/, adapter_init/ (step 0, for the
parameter-update gate) and checkpoints/step-N/ (adapter + optimizer + step, for exact resume).

Each folder is written atomically (a temp folder renamed into place), so a crash, a signal or a full disk
leaves the previous one intact; a file that is damaged anyway is reported by name.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import mlx.core as mx
from mlx.utils import tree_flatten, tree_unflatten

from finetune import faults
from finetune.errors import UserError
from finetune.system.atomic import atomic_dir

CHECKPOINTS = "checkpoints"
ADAPTER_DIR = "adapter"
BEST_DIR = "adapter_best"
INIT_DIR = "adapter_init"
RESULT = "train_result.json"  # the finished training's summary (finetune.train.engine writes it)
ADAPTER_FILE = "adapters.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


class CheckpointError(UserError):
    """A checkpoint or adapter on disk cannot be read; the message names the file."""


def trainable_weights(model) -> dict[str, mx.array]:
    return dict(tree_flatten(model.trainable_parameters()))


def save_adapter(model, acfg: dict, out: Path) -> Path:
    with atomic_dir(out) as tmp:
        mx.save_safetensors(str(tmp / ADAPTER_FILE), trainable_weights(model))
        (tmp / ADAPTER_CONFIG).write_text(json.dumps(acfg, indent=2))
    return out


def save_final_adapter(model, acfg: dict, out: Path) -> Path:
    """The shipped adapter; the artifact faults are planted here (after a correct save)."""
    save_adapter(model, acfg, out)
    faults.point("adapter_scale_zero", out)
    return faults.point("adapter_truncated", out)


def save_checkpoint(run_dir: Path, step: int, model, optimizer, acfg: dict, state: dict) -> Path:
    out = run_dir / CHECKPOINTS / f"step-{step:07d}"
    try:
        with atomic_dir(out) as tmp:
            mx.save_safetensors(str(tmp / ADAPTER_FILE), trainable_weights(model))
            faults.point(
                "disk_full_checkpoint", tmp / "optimizer.safetensors", latest_checkpoint(run_dir) is not None
            )
            mx.save_safetensors(str(tmp / "optimizer.safetensors"), dict(tree_flatten(optimizer.state)))
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(acfg, indent=2))
            (tmp / "state.json").write_text(json.dumps({**state, "step": step}, indent=2))
    except OSError as exc:
        previous = latest_checkpoint(run_dir)
        kept = f"; the previous checkpoint {previous} is intact" if previous else ""
        raise OSError(exc.errno, f"cannot write checkpoint {out}: {exc.strerror}{kept}") from exc
    return out


def latest_checkpoint(run_dir: Path) -> Path | None:
    found = sorted((run_dir / CHECKPOINTS).glob("step-*[0-9]"))
    return found[-1] if found else None


def _load(path: Path) -> dict[str, Any]:
    try:
        return mx.load(str(path))
    except Exception as exc:  # MLX raises plain RuntimeError/ValueError for a damaged file
        raise CheckpointError(
            f"{path} is damaged or not a safetensors file ({exc}); delete {path.parent} to resume from the "
            f"previous checkpoint (or {path.parent.parent} to train from the start)"
        ) from exc


def restore_checkpoint(ckpt: Path, model, optimizer) -> dict:
    model.load_weights(list(_load(ckpt / ADAPTER_FILE).items()), strict=False)
    optimizer.state = tree_unflatten(list(_load(ckpt / "optimizer.safetensors").items()))
    optimizer.init(model.trainable_parameters())
    try:
        return json.loads((ckpt / "state.json").read_text())
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"{ckpt / 'state.json'} is unreadable ({exc})") from exc
