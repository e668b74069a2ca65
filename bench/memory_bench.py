"""Peak training memory of LoRA and full fine-tuning, measured by MLX vs finetune.train.memory's prediction.

Each measurement is a fresh `python -m finetune.train.peak_memory` process (peaks must not leak between runs):
a few optimizer steps on one fixed batch of the prepared data, mx.get_peak_memory() from after the
weights are loaded. The prediction uses the batch shape the probe really trained on.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from bench.stats import Figure, Goal, Section

GOAL_ERROR_PCT = Goal("abs<=", 15.0, "|error| ≤ 15 %")
MIB = 2**20
COLUMNS = [
    "type",
    "batch",
    "trainable (MLX)",
    "trainable (predicted)",
    "measured MiB",
    "predicted MiB",
    "error %",
    "predicted peak moment",
]


def predict(model_config: dict, cfg: Any, fine_tune_type: str, batch_shape: list[int]):
    from finetune.train.memory import ModelShape, estimate

    return estimate(
        ModelShape.from_hf_config(model_config),
        fine_tune_type=fine_tune_type,
        batch_size=batch_shape[0],
        seq_len=batch_shape[1] - 1,  # a batch of width w feeds the model w - 1 tokens
        lora_rank=cfg.lora.rank,
        lora_num_layers=cfg.lora.num_layers,
        lora_keys=cfg.lora.keys,
        grad_checkpoint=cfg.training.grad_checkpoint,
        optimizer=cfg.training.optimizer,
    )


def summarize(model: str, rows: dict[str, dict[str, Any]]) -> Section:
    """rows: fine_tune_type -> {"measured": probe JSON, "predicted_bytes", "error_pct", "predicted_params"}."""
    s = Section("memory", f"Peak training memory on {model}: measured vs predicted")
    table = []
    for ft, r in rows.items():
        m = r["measured"]
        batch = f"{m['batch_shape'][0]}×{m['batch_shape'][1]}"
        measured, predicted = m["peak_bytes"] / MIB, r["predicted_bytes"] / MIB
        detail = f"measured {measured:.0f} MiB, predicted {predicted:.0f} MiB, batch {batch}"
        label = f"{ft} peak memory: prediction error"
        fig = s.add(
            Figure(f"memory.{ft}_error_pct", label, r["error_pct"], "%", GOAL_ERROR_PCT, detail=detail)
        )
        if fig.met is False:
            breakdown = ", ".join(f"{k} {v / MIB:.0f} MiB" for k, v in r["breakdown"].items())
            fig.reason = f"estimate {'over' if r['error_pct'] > 0 else 'under'}shoots; breakdown {breakdown}"
        table.append(
            [
                ft,
                batch,
                f"{m['trainable_params']:,}",
                f"{r['predicted_params']:,}",
                f"{measured:.1f}",
                f"{predicted:.1f}",
                f"{r['error_pct']:+.1f}",
                r.get("peak_phase", ""),
            ]
        )
    if "lora" in rows and "full" in rows:
        saving = 1 - rows["lora"]["measured"]["peak_bytes"] / rows["full"]["measured"]["peak_bytes"]
        label = "LoRA peak below full fine-tuning (measured)"
        s.add(Figure("memory.lora_saving", label, 100 * saving, "% less"))
    s.table(COLUMNS, table)
    s.notes.append(
        "Measured: `finetune.train.peak_memory` in its own process, 3 Adam steps on one fixed batch, "
        "mx.get_peak_memory() (weights included). Full fine-tuning trains every parameter, "
        "as `finetune train` does with fine_tune_type full."
    )
    s.data = rows
    return s


def run_section(
    work: Path, cfg: Any, model_path: Path, data_dir: Path, *, steps: int = 3, log=print
) -> Section:
    from finetune.config.loader import save_config
    from finetune.train.memory import compare
    from finetune.train.peak_memory import measure_in_subprocess

    cfg_path = save_config(cfg, work / "peak_memory.yaml")
    model_config = json.loads((Path(model_path) / "config.json").read_text())
    rows = {}
    for ft in ("lora", "full"):
        measured = measure_in_subprocess(cfg_path, model_path, data_dir, ft, steps)
        est = predict(model_config, cfg, ft, measured["batch_shape"])
        cmp = compare(est, measured["peak_bytes"])
        rows[ft] = {
            "measured": measured,
            "predicted_bytes": est.total_bytes,
            "error_pct": cmp.error_pct,
            "predicted_params": est.trainable_params,
            "breakdown": est.breakdown,
            "peak_phase": est.peak_phase,
        }
        log(f"  memory {ft}: measured {measured['peak_bytes'] / MIB:.0f} MiB, error {cmp.error_pct:+.1f} %")
    return summarize(cfg.model.name, rows)
