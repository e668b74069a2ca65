"""One local rank of a data-parallel training (`python -m finetune.train.rank_main SPEC`), started by
finetune.train.ranks with MLX_RANK and MLX_HOSTFILE set; exits 0, 128+signal when stopped, 1 on an error.

Rank 0 trains the job in SPEC; the others follow it (finetune.train.follower) on the same machine's model and
prepared data, which SPEC names too."""

from __future__ import annotations

import pickle
import sys
from pathlib import Path

import finetune  # noqa: F401 - the fast BLAS before MLX loads
from finetune.system import signals
from finetune.train import distributed
from finetune.train.engine import train_run
from finetune.train.follower import follow


def main(argv: list[str]) -> int:
    job = pickle.loads(Path(argv[0]).read_bytes())  # written by our own parent process, in its private folder
    model_path, data_dir = Path(job["model_path"]), Path(job["data_dir"])
    world = distributed.join(backend="ring")
    distributed.beat(world, "connected")
    with signals.handled():
        try:
            if not world.writer:
                return follow(world, train_run, resolve=lambda _cfg: model_path,
                              prepare=lambda _cfg, _model, _out: data_dir)  # fmt: skip
            with distributed.leading(world):
                train_run(job["cfg"], model_path, data_dir, Path(job["run_dir"]), resume=job["resume"],
                          on_trained=job["on_trained"], log=print, world=world)  # fmt: skip
        except signals.Interrupted as stop:
            return stop.exit_code
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
