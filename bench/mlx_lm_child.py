"""`python -m bench.mlx_lm_child -c CONFIG`: the raw `mlx_lm lora` CLI (its main(), unchanged) plus two lines.

`BENCH_LOOP_START <epoch s>` when mlx-lm's train() is called (after loading, data and adapters), with MLX's
peak-memory counter reset there as `finetune train` resets it, and `BENCH_PEAK_MEMORY_BYTES <n>` at exit:
mlx-lm 0.32 prints no peak memory of its own.
"""

from __future__ import annotations

import atexit
import sys
import time


def main(argv: list[str] | None = None) -> int:
    import mlx.core as mx
    from mlx_lm import lora

    original = lora.train

    def train(*args, **kwargs):
        mx.reset_peak_memory()
        print(f"BENCH_LOOP_START {time.time():.6f}", flush=True)
        return original(*args, **kwargs)

    lora.train = train
    atexit.register(lambda: print(f"BENCH_PEAK_MEMORY_BYTES {int(mx.get_peak_memory())}", flush=True))
    sys.argv = ["mlx_lm.lora", *(sys.argv[1:] if argv is None else argv)]
    lora.main()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
