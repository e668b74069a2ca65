"""reset_peak: MLX's peak counts what is live from then on, not garbage earlier work left uncollected."""

from __future__ import annotations

import gc

import mlx.core as mx

from finetune.system.mlx_peak import reset_peak


def _peak_of_work(planted: int) -> int:
    """The peak while 4 MiB of work runs, after `planted` bytes were left in an uncollected cycle."""
    gc.disable()  # as when the collector has not run yet: the cycle's arrays are still allocated
    try:
        if planted:
            cycle = {"weights": mx.ones((planted // 4,), dtype=mx.float32)}
            mx.eval(cycle["weights"])
            cycle["self"] = cycle
            del cycle
        reset_peak()
        work = mx.ones((2**20,), dtype=mx.float32) * 2
        mx.eval(work)
        return int(mx.get_peak_memory())
    finally:
        gc.enable()


def test_garbage_left_in_the_process_is_not_counted():
    clean = _peak_of_work(0)
    planted = 32 * 2**20
    dirty = _peak_of_work(planted)
    # nearer the clean peak than the clean peak plus the garbage (a LoRA probe's peak once passed full's on it)
    assert dirty - clean < planted / 2, (dirty, clean)
