"""finetune.train.batches: padded batches with loss masks, deterministic batch order, the masked loss."""

import mlx.core as mx
import numpy as np
import pytest

from finetune.data.tokens import PAD_TO
from finetune.train.batches import TokenDataset, batch_at, longest_batch, make_iterate_batches, masked_loss

DATA = TokenDataset(
    [(list(range(1, n + 1)), [0] * (n // 2) + [1] * (n - n // 2)) for n in range(4, 20)], "toy"
)


def test_batch_order_is_a_pure_function_of_seed_and_index():
    first = [batch_at(DATA, 4, seed=3, index=i) for i in range(12)]
    assert first == [batch_at(DATA, 4, seed=3, index=i) for i in range(12)]
    assert first != [batch_at(DATA, 4, seed=4, index=i) for i in range(12)]
    # every epoch covers each bucket once
    assert sorted(map(tuple, first[:4])) == sorted(map(tuple, first[4:8]))
    assert sorted(i for b in first[:4] for i in b) == list(range(16))


def test_the_longest_batch_is_one_every_epoch_trains():
    longest = longest_batch(DATA, 4)
    assert sorted(len(DATA[i][0]) for i in longest) == [16, 17, 18, 19]  # the four longest rows
    epoch = [sorted(batch_at(DATA, 4, seed=3, index=i)) for i in range(4)]
    assert sorted(longest) in epoch
    assert longest_batch(TokenDataset(DATA.items[:3], "few"), 4) == [0, 1, 2]  # fewer rows than a batch


def test_iterator_resumes_at_a_given_batch():
    whole = make_iterate_batches(7)(DATA, 4, 64, loop=True)
    batches = [next(whole) for _ in range(6)]
    resumed = make_iterate_batches(7, start_batch=4)(DATA, 4, 64, loop=True)
    ids, _ = next(resumed)
    assert np.array_equal(np.array(ids), np.array(batches[4][0]))


def test_padding_and_masks():
    ids, mask = next(make_iterate_batches(0)(DATA, 4, 64, loop=False))
    assert ids.shape == mask.shape and ids.shape[1] == 1 + PAD_TO  # padded to 1 + a multiple of 32
    assert float(mask[0].sum()) == DATA[0][1].count(1)
    assert (
        int(ids[0, len(DATA[0][0])]) == 0 and float(mask[0, len(DATA[0][1]) :].sum()) == 0
    )  # padding is masked
    ids, _ = next(make_iterate_batches(0)(DATA, 4, 8, loop=False))
    assert ids.shape[1] == 8  # truncated to max_seq_length


def test_evaluation_sees_every_example_once_in_order():
    seen = [np.array(ids) for ids, _ in make_iterate_batches(0)(DATA, 5, 64, loop=False)]
    assert [len(b) for b in seen] == [5, 5, 5, 1]
    firsts = [int(row[0]) for b in seen for row in b]
    assert firsts == [1] * 16  # every row starts at token 1; 16 rows, none repeated or dropped
    assert [int((row > 0).sum()) for b in seen for row in b] == list(range(4, 20))
    small = list(make_iterate_batches(0)(DATA, 32, 64, loop=False))  # batch bigger than the split: one batch
    assert len(small) == 1 and small[0][0].shape[0] == 16


def test_too_small_dataset_is_a_clear_error():
    with pytest.raises(ValueError, match="toy: 16 examples, fewer than batch_size=32"):
        next(make_iterate_batches(0)(DATA, 32, 64, loop=True))


def test_masked_loss_ignores_masked_targets():
    vocab = 5

    def model(x):  # logits favour token 1 everywhere
        return mx.broadcast_to(mx.array([0.0, 5.0, 0.0, 0.0, 0.0]), (*x.shape, vocab))

    batch = mx.array([[0, 1, 3]])
    loss_on_1, n = masked_loss(model, batch, mx.array([[0.0, 1.0, 0.0]]))
    loss_on_3, _ = masked_loss(model, batch, mx.array([[0.0, 0.0, 1.0]]))
    assert float(n) == 1 and float(loss_on_1) < 0.1 < float(loss_on_3)
    both, n = masked_loss(model, batch, mx.array([[1.0, 1.0, 1.0]]))  # the first mask entry has no target
    assert float(n) == 2 and float(both) == pytest.approx((float(loss_on_1) + float(loss_on_3)) / 2, rel=1e-5)


# ---------------------------------------------------------------- load_split on prepared files
