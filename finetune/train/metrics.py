"""metrics.jsonl: one row per training step ("train") and per evaluation ("val"), appended as training goes."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from finetune.system.atomic import atomic_write_text
from finetune.system.jsonl import read_log

METRICS = "metrics.jsonl"


def read_metrics(path: Path) -> list[dict]:
    return read_log(path)


def train_losses(rows: Sequence[dict]) -> list[float]:
    return [r["train_loss"] for r in sorted(rows, key=lambda r: r["step"]) if r.get("kind") == "train"]


def val_losses(rows: Sequence[dict]) -> list[tuple[int, float]]:
    return [
        (r["step"], r["val_loss"]) for r in sorted(rows, key=lambda r: r["step"]) if r.get("kind") == "val"
    ]


def truncate_metrics(path: Path, step: int) -> None:
    """Drop metrics past the resume point so a resumed run's log equals an uninterrupted one."""
    if not path.exists():
        return
    kept = [
        json.dumps(row)
        for row in read_metrics(path)  # skips a torn last line from a crash
        # a fresh start (step 0) evaluates again; a later resume point's evaluation already happened
        if row.get("step", 0) <= step and not (row.get("kind") == "val" and row.get("step") == step == 0)
    ]
    atomic_write_text(path, "".join(line + "\n" for line in kept))
