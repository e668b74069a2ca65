"""One local rank of a data-parallel training (`python -m finetune.train.rank_main SPEC`), started by
finetune.train.ranks with MLX_RANK and MLX_HOSTFILE set; exits 0, 128+signal when stopped, 1 on an error."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import finetune  # noqa: F401 - the fast BLAS before MLX loads
from finetune.system import signals
from finetune.train import distributed
from finetune.train.engine import train_run


def main(argv: list[str]) -> int:
    job = pickle.loads(Path(argv[0]).read_bytes())  # written by our own parent process, in its private folder
    world = distributed.join(backend="ring")
    distributed.beat(world, "connected")
    log = print if world.writer else (lambda _: None)
    with signals.handled():
        try:
            train_run(job["cfg"], Path(job["model_path"]), Path(job["data_dir"]), Path(job["run_dir"]),
                      resume=job["resume"], on_trained=job["on_trained"], log=log, world=world)  # fmt: skip
        except signals.Interrupted as stop:
            return stop.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
