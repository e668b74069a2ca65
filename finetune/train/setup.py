"""Setting a model up for training: adapters attached (or everything trainable), and the optimizer."""

from __future__ import annotations

from typing import Any

import mlx.optimizers as optim
from mlx_lm.tuner.utils import linear_to_lora_layers

from finetune import faults
from finetune.config.schema import RunConfig


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
        faults.point("lora_trains_everything", model)
    faults.point("base_weight_trained", model, final_norm)
    return acfg


def final_norm(model) -> tuple[str, Any]:
    """The model's final norm (model.norm, model.ln_f, ...): the norm module with the shortest path."""
    norms = [(n, m) for n, m in model.named_modules() if n.endswith(("norm", "ln_f"))]
    return min(norms, key=lambda nm: (nm[0].count("."), nm[0]))


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
    lr = faults.point("lr_too_high", faults.point("lr_zero", lr))
    if t.optimizer == "adamw":
        opt: optim.Optimizer = optim.AdamW(learning_rate=lr, weight_decay=t.weight_decay)
    elif t.optimizer == "sgd":
        opt = optim.SGD(learning_rate=lr, weight_decay=t.weight_decay)
    else:
        opt = optim.Adam(learning_rate=lr)
    return faults.point("one_adapter_frozen", faults.point("frozen_lora", opt))
