"""What a training run returns and leaves in RUN/train_result.json (rank 0 writes it in a data-parallel run)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any


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
