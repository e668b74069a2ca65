"""MLX's peak memory count (mx.get_peak_memory), started from what this process holds live."""

from __future__ import annotations

import gc


def reset_peak() -> None:
    """Count MLX's peak from now, from what is live now: arrays that earlier work in this process left in cycles
    not collected yet would count too (a fresh probe process has none; a test process, or a run after its
    earlier stages, may)."""
    import mlx.core as mx

    gc.collect()
    mx.reset_peak_memory()
