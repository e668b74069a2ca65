"""finetune.train.distributed: a rank's shard, the global denominator, and the digests ranks compare.

The maths is checked in one process here (each rank's shard computed in turn, then averaged the way mlx-lm's
average_gradients does); test_ranks.py runs the same through real ranks and MLX's ring backend.
"""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from finetune.config.loader import load_config
from finetune.train import distributed
from finetune.train.batches import make_iterate_batches, masked_loss, pack
from finetune.train.distributed import World
from tests.conftest import build_toy_model

ROWS = [  # (ids, mask): uneven lengths and answer spans, one row longer than max_seq_length below
    ([1, 5, 9, 13, 2, 7, 7], [0, 0, 0, 1, 1, 1, 1]),
    ([1, 6, 2, 8], [0, 0, 1, 1]),
    ([1, 4, 4, 4, 4, 3] + [11] * 40, [0, 0, 0, 0, 1, 1] + [1] * 40),
    ([1, 12, 2, 9, 9], [0, 0, 0, 1, 1]),
    ([1, 3, 2], [0, 1, 1]),
]
MAX_LEN = 40
K = 8  # within K x the noise floor measured beside it


def test_the_global_target_count_is_what_one_packed_batch_weights():
    _, mask = pack(ROWS, MAX_LEN)
    assert distributed.target_count(ROWS, MAX_LEN) == float(mask[:, 1:].sum())


def test_shards_cover_the_batch_once_in_rank_order():
    shards = [distributed.shard(ROWS, World(r, 2)) for r in range(2)]
    assert [len(s) for s in shards] == [3, 2]
    assert sorted(map(str, shards[0] + shards[1])) == sorted(map(str, ROWS))


def _loss_and_grads(model, loss, batch):
    value, grads = nn.value_and_grad(model, lambda m, *b: loss(m, *b)[0])(model, *batch)
    return value, dict(tree_flatten(grads))


@pytest.mark.parametrize("size", [2, 3])
def test_the_average_of_rank_losses_and_gradients_is_the_one_rank_batch(size):
    model = build_toy_model(seed=3)
    model.freeze()
    model.unfreeze(keys=["weight"], recurse=True, strict=False)  # every weight trains: all get gradients
    ids, mask = pack(ROWS, MAX_LEN)
    whole, whole_grads = _loss_and_grads(model, masked_loss, (mx.array(ids), mx.array(mask)))
    ranks = []
    for r in range(size):
        batch = distributed.shard_build(lambda rows, n: tuple(map(mx.array, pack(rows, n))), World(r, size))(
            ROWS, MAX_LEN
        )
        ranks.append(_loss_and_grads(model, distributed.sharded_loss(masked_loss, World(r, size)), batch))
    mean = sum(v for v, _ in ranks) / size  # what mlx-lm reports: all_sum(loss) / N
    grads = {k: sum(g[k] for _, g in ranks) / size for k in whole_grads}  # average_gradients: all_sum / N
    # the noise floor: the same batch with its rows reversed (the same sums in another order), at least 1 ulp
    rev, rev_grads = _loss_and_grads(
        model, masked_loss, (mx.array(ids[::-1].copy()), mx.array(mask[::-1].copy()))
    )

    def gap(a, b):  # relative to the tensor's size, at least one float32 ulp of it
        scale = float(mx.abs(a).max().item()) or 1.0
        return max(float(mx.abs(a - b).max().item()), float(np.spacing(np.float32(scale)))) / scale

    assert gap(mean, whole) <= K * gap(rev, whole)
    worst = max(gap(grads[k], g) for k, g in whole_grads.items())
    assert worst <= K * max(gap(rev_grads[k], g) for k, g in whole_grads.items())


def test_a_shard_with_no_targets_adds_nothing_not_nan():
    model = build_toy_model(seed=3)
    ids, mask = pack(ROWS[:2], MAX_LEN)
    value, toks = distributed.sharded_loss(masked_loss, World(0, 2))(
        model, mx.array(ids), mx.array(np.zeros_like(mask)), mx.array(5.0)
    )
    assert value.item() == 0.0 and toks.item() == 0


def test_evaluation_batches_are_dealt_round_robin_and_training_batches_sharded():
    data = [r for r in ROWS for _ in range(2)]  # 10 rows: 5 evaluation batches of 2
    iterate = make_iterate_batches(seed=0, build=lambda rows, n: rows)
    dealt = [list(distributed.shard_batches(iterate, World(r, 2))(data, 2, MAX_LEN)) for r in range(2)]
    assert [len(d) for d in dealt] == [3, 2]
    one = make_iterate_batches(seed=0, build=lambda rows, n: rows)
    two = make_iterate_batches(
        seed=0, build=lambda rows, n: rows, train_build=lambda rows, n: ("shard", rows)
    )
    assert next(two(data, 2, MAX_LEN, loop=True)) == ("shard", next(one(data, 2, MAX_LEN, loop=True)))


def test_one_rank_is_left_exactly_as_it_was():
    build, iterate = (lambda rows, n: rows), make_iterate_batches(seed=0)
    assert distributed.shard_build(build, distributed.SINGLE) is build
    assert distributed.shard_batches(iterate, distributed.SINGLE) is iterate
    distributed.agree(distributed.SINGLE, {"anything": "00" * 32})  # nobody to compare with
    assert distributed.stop_requested(distributed.SINGLE, True) and not distributed.stop_requested(
        distributed.SINGLE, False
    )


def test_the_digest_names_what_changed(tmp_path, sums_dir, tiny_hf):
    cfg = load_config()
    base = distributed.run_digest(cfg, tiny_hf, sums_dir)
    assert set(base) == {"code and MLX", "config", "data", "model"}
    other = cfg.model_copy(deep=True)
    other.training.learning_rate *= 2
    changed = distributed.run_digest(other, tiny_hf, sums_dir)
    assert [k for k in base if base[k] != changed[k]] == ["config"]
    data = tmp_path / "data"
    data.mkdir()
    (data / "train.jsonl").write_text((sums_dir / "train.jsonl").read_text() + "\n")
    (data / "valid.jsonl").write_text((sums_dir / "valid.jsonl").read_text())
    assert [k for k, v in distributed.run_digest(cfg, tiny_hf, data).items() if base[k] != v] == ["data"]


def test_a_process_not_started_as_a_rank_is_a_world_of_one(monkeypatch):
    for key in distributed.LAUNCH_ENV:
        monkeypatch.delenv(key, raising=False)
    assert not distributed.launched() and distributed.join() == distributed.SINGLE
