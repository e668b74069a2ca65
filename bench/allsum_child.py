"""One rank of bench/ranks_bench.allsum_ms: times all_sum of N float32 (MLX ring backend); rank 0 prints JSON."""

from __future__ import annotations

import json
import sys
import time

import finetune  # noqa: F401  (the same BLAS and thread defaults as training)


def main(argv: list[str]) -> int:
    import mlx.core as mx  # after finetune: its BLAS first

    world = mx.distributed.init(strict=True, backend="ring")
    x = mx.ones((int(argv[0]),))
    mx.eval(mx.distributed.all_sum(x, stream=mx.cpu))
    times = []
    for _ in range(31):
        tic = time.perf_counter()
        mx.eval(mx.distributed.all_sum(x, stream=mx.cpu))
        times.append(time.perf_counter() - tic)
    if world.rank() == 0:
        print(json.dumps({"median_ms": sorted(times)[15] * 1e3}))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
