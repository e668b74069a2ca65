"""finetune.train.rank_main: one rank started by hand, the way finetune.train.ranks starts it."""

import json
import os
import pickle
import socket
import subprocess
import sys

from finetune.config.loader import load_config


def test_a_rank_whose_peers_never_come_exits_1_naming_the_world(tmp_path, tiny_hf, sums_dir):
    # rank 1 of 2 whose own address is taken by another socket: it says so and exits 1
    spec = tmp_path / "spec.pkl"
    cfg = load_config(overrides=["training.ranks=2", "training.batch_size=2"])
    spec.write_bytes(pickle.dumps(dict(cfg=cfg, model_path=str(tiny_hf), data_dir=str(sums_dir),
                                       run_dir=str(tmp_path / "run"), resume=False, on_trained=None)))  # fmt: skip
    with socket.socket() as peer, socket.socket() as taken:
        for s in (peer, taken):  # rank 0's address accepts (and never speaks); rank 1's is someone else's
            s.bind(("127.0.0.1", 0))
            s.listen()
        hosts = tmp_path / "hosts.json"
        hosts.write_text(json.dumps([[f"127.0.0.1:{s.getsockname()[1]}"] for s in (peer, taken)]))
        env = {**os.environ, "MLX_RANK": "1", "MLX_HOSTFILE": str(hosts), "MLX_WORLD_SIZE": "2"}
        done = subprocess.run([sys.executable, "-m", "finetune.train.rank_main", str(spec)], env=env,
                              cwd=tmp_path, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert done.returncode == 1
    assert "started as rank 1 of a data-parallel world, but MLX could not join it" in done.stderr
    assert not (tmp_path / "run").exists()  # a rank writes nothing before it has a world
