"""Which packaged model and batch size fit the memory this machine has free (tiers 2 and 3 use it).

Memory table (measured MLX peak for smollm2 f32 LoRA, batch 4 x 64 tokens: ~0.85 GB):
  available >= 4 GiB    smollm2-135m, batch 4
  available >= 1.5 GiB  smollm2-135m, batch 1
  below                 no model: skip, with the reason
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.models.packaged import SMOLLM2

GIB = 1024**3


@dataclass(frozen=True)
class Choice:
    model_spec: str | None
    batch_size: int
    reason: str


MEMORY_TABLE = ((4 * GIB, SMOLLM2, 4), (int(1.5 * GIB), SMOLLM2, 1))


def choose_for_memory(available_bytes: int | None) -> Choice:
    """Pick model and batch size from available memory (table in the module docstring)."""
    if available_bytes is None:
        return Choice(None, 0, "available memory unknown: not choosing a model")
    have = available_bytes / GIB
    for need, spec, batch in MEMORY_TABLE:
        if available_bytes >= need:
            return Choice(
                spec, batch, f"{have:.1f} GiB available >= {need / GIB:.1f} GiB: {spec} batch {batch}"
            )
    floor = MEMORY_TABLE[-1][0] / GIB
    return Choice(None, 0, f"only {have:.2f} GiB available; {SMOLLM2} needs >= {floor:.1f} GiB: skipping")
