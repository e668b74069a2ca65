"""finetune.train.ranks: real local ranks (MLX's ring backend on 127.0.0.1) training the tiny Llama from disk.

Exactness is judged against a noise floor measured here: the same one-rank training with the exact shortcuts
off, which is the same maths summed in another order (data parallelism only reorders the same sums too).
"""

import json
import shutil
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest

from finetune.config.loader import load_config
from finetune.system import procs
from finetune.train.checkpoints import ADAPTER_DIR
from finetune.train.engine import train_run
from finetune.train.metrics import METRICS, read_metrics, train_losses, val_losses
from finetune.train.ranks import RankFailure, data_parallel, train_local_ranks

K = 16  # N ranks within K x the floor (one rank, rows reordered); measured here: 5.7x losses, 4.5x adapter


def _cfg(**overrides):
    sets = {"training.iters": 12, "training.batch_size": 4, "training.learning_rate": 5e-3, "training.eval_every": 4,
            "training.save_every": 4, "data.max_seq_length": 64, "lora.rank": 4, "lora.scale": 2.0}  # fmt: skip
    sets.update(overrides)
    return load_config(overrides=[f"{k}={v}" for k, v in sets.items()])


def _train(cfg, model_dir, data_dir, run_dir, **kw):
    run_dir.mkdir(parents=True, exist_ok=True)
    return data_parallel(train_run)(cfg, model_dir, data_dir, run_dir, log=lambda *_: None, **kw)


def _losses(run_dir: Path) -> np.ndarray:
    rows = read_metrics(run_dir / METRICS)
    return np.array([*train_losses(rows), *(v for _, v in val_losses(rows))])


def _adapter(run_dir: Path) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in mx.load(str(run_dir / ADAPTER_DIR / "adapters.safetensors")).items()}


def _gap(a: Path, b: Path) -> tuple[float, float]:
    la, lb = _losses(a), _losses(b)
    wa, wb = _adapter(a), _adapter(b)
    assert la.shape == lb.shape and wa.keys() == wb.keys()
    return float(np.abs(la - lb).max()), max(float(np.abs(wa[k] - wb[k]).max()) for k in wa)


def _floor(gaps: tuple[float, float], scale: tuple[float, float]) -> tuple[float, float]:
    # Never below one float32 ulp of what is compared: a floor of exactly 0 says nothing about the next machine.
    return tuple(max(g, float(np.spacing(np.float32(s)))) for g, s in zip(gaps, scale, strict=True))


def _reversed_rows(*args, iterate_batches, **kwargs):
    """mlx-lm's train() on every batch with its rows in reverse order: the same sums in another order."""
    from mlx_lm.tuner.trainer import train as mlx_train

    def iterate(*a, **kw):
        for ids, mask in iterate_batches(*a, **kw):
            yield ids[::-1], mask[::-1]

    return mlx_train(*args, iterate_batches=iterate, **kwargs)


@pytest.fixture(scope="module")
def one_rank(tiny_hf, sums_dir, tmp_path_factory):
    """The one-rank run and the noise floor: the plain path (no shortcuts: batches are ids + mask) against
    itself with each batch's rows reversed."""
    runs = tmp_path_factory.mktemp("one-rank")
    _train(_cfg(), tiny_hf, sums_dir, runs / "fast")
    plain = _cfg(**{"training.cache_frozen_prefix": False, "training.loss_positions_only": False,
                    "training.trim_batches": False})  # fmt: skip
    _train(plain, tiny_hf, sums_dir, runs / "plain")
    _train(plain, tiny_hf, sums_dir, runs / "reversed", train_fn=_reversed_rows)
    loss_scale = float(np.abs(_losses(runs / "fast")).max())
    weight_scale = max(float(np.abs(w).max()) for w in _adapter(runs / "fast").values())
    floor = _floor(_gap(runs / "plain", runs / "reversed"), (loss_scale, weight_scale))
    print(
        f"noise floor: losses {floor[0]:.2e}, adapter {floor[1]:.2e}; shortcuts vs plain {_gap(runs / 'fast', runs / 'plain')}"
    )
    return runs / "fast", floor


def test_two_ranks_train_what_one_rank_trains_and_only_rank_0_writes(one_rank, tiny_hf, sums_dir, tmp_path):
    single, (loss_floor, weight_floor) = one_rank
    result = _train(_cfg(**{"training.ranks": 2}), tiny_hf, sums_dir, tmp_path / "two")
    loss_gap, weight_gap = _gap(single, tmp_path / "two")
    print(f"2 ranks vs 1: losses {loss_gap:.2e} (floor {loss_floor:.2e}), adapter {weight_gap:.2e} "
          f"(floor {weight_floor:.2e})")  # fmt: skip
    assert loss_gap <= K * loss_floor and weight_gap <= K * weight_floor
    assert result.steps == 12 and result.peak_memory_bytes > 0
    # one writer: the same files, each metrics row once, no pid file left behind
    files = lambda d: sorted(p.relative_to(d).as_posix() for p in d.rglob("*") if p.is_file())  # noqa: E731
    assert files(tmp_path / "two") == files(single)
    assert len(read_metrics(tmp_path / "two" / METRICS)) == len(read_metrics(single / METRICS))


def test_three_ranks_with_an_uneven_share_are_exact_too(one_rank, tiny_hf, sums_dir, tmp_path):
    single, (loss_floor, weight_floor) = one_rank
    _train(_cfg(**{"training.ranks": 3}), tiny_hf, sums_dir, tmp_path / "three")  # 4 rows: 2 + 1 + 1
    loss_gap, weight_gap = _gap(single, tmp_path / "three")
    assert loss_gap <= K * loss_floor and weight_gap <= K * weight_floor


def test_a_rank_running_other_code_is_refused_by_name(tiny_hf, sums_dir, tmp_path):
    import finetune

    other = tmp_path / "other"
    shutil.copytree(
        Path(finetune.__file__).parent, other / "finetune", ignore=shutil.ignore_patterns("__pycache__")
    )
    with (other / "finetune" / "train" / "ranks.py").open("a") as f:
        f.write("# a different FineTune\n")
    env = lambda rank: {"PYTHONPATH": str(other)} if rank == 1 else {}  # noqa: E731
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    with pytest.raises(
        RankFailure, match=r"rank \d exited with code 1: RankMismatch: rank 1 runs another code and MLX"
    ):
        train_local_ranks(_cfg(**{"training.ranks": 2}), tiny_hf, sums_dir, run_dir, rank_env=env,
                          log=lambda *_: None)  # fmt: skip
    assert not (run_dir / ADAPTER_DIR).exists()
    assert procs.orphans(procs.recorded(run_dir / procs.PID_DIR)) == []


def test_under_a_launcher_training_joins_its_world(monkeypatch, tiny_hf, sums_dir, tmp_path):
    # mlx.launch sets MLX_RANK; alone (no hostfile) MLX's ring backend is a world of one, which trains as usual
    monkeypatch.setenv("MLX_RANK", "0")
    seen = []
    fake = lambda *a, world, **kw: seen.append(world)  # noqa: E731
    data_parallel(fake)(_cfg(**{"training.ranks": 2}), tiny_hf, sums_dir, tmp_path)
    assert [w.size for w in seen] == [1]


def test_ranks_must_not_outnumber_the_batch():
    with pytest.raises(ValueError, match="ranks=5 needs batch_size >= ranks"):
        _cfg(**{"training.ranks": 5})


def test_a_rank_that_never_connects_is_named_within_the_timeout(tiny_hf, sums_dir, tmp_path):
    import socket

    # rank 1's address is taken by a socket that accepts and never speaks: rank 0 waits, rank 1 cannot bind
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        ports = lambda n: [procs.free_port(), taken.getsockname()[1]]  # noqa: E731
        cfg = _cfg(**{"training.ranks": 2, "training.rank_timeout_s": 20})
        run_dir = tmp_path / "run"
        run_dir.mkdir()
        with pytest.raises(RankFailure, match=r"rank 1 (could not connect|exited with code)") as caught:
            train_local_ranks(cfg, tiny_hf, sums_dir, run_dir, ports=ports, log=lambda *_: None)
    print(caught.value)
    assert "no checkpoint was written yet" in str(caught.value)
    assert procs.orphans(procs.recorded(run_dir / procs.PID_DIR)) == []
    assert json.dumps(str(caught.value))


def test_the_local_ranks_ports_come_from_ft_rank_ports_or_are_free(monkeypatch):
    from finetune.errors import UserError
    from finetune.train.ranks import PORTS_ENV, free_ports

    monkeypatch.delenv(PORTS_ENV, raising=False)
    free = free_ports(2)
    assert len(set(free)) == 2 and all(0 < p < 65536 for p in free)
    monkeypatch.setenv(PORTS_ENV, "29500, 29501")
    assert free_ports(2) == [29500, 29501]
    for bad in ("29500", "29500,29500", "29500,x", "29500,70000"):
        monkeypatch.setenv(PORTS_ENV, bad)
        with pytest.raises(UserError, match=rf"{PORTS_ENV}=.*give 2 distinct ports"):
            free_ports(2)
