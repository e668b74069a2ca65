"""finetune.train.batches: tokenized splits with loss masks, deterministic batch order, the masked loss."""

import json

import mlx.core as mx
import numpy as np
import pytest

from finetune.data.tokens import PAD_TO
from finetune.system.jsonl import read_jsonl
from finetune.train.batches import (
    TOKENS_KEPT,
    TokenDataset,
    batch_at,
    load_split,
    make_iterate_batches,
    masked_loss,
    record_tokens,
)

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


def test_load_split_tokenizes_with_the_prepared_spans(sums_dir, toy_tokenizer):
    split = load_split(sums_dir / "train.jsonl", toy_tokenizer, 64, mask_prompt=True)
    rows = read_jsonl(sums_dir / "train.jsonl")
    assert len(split) == len(rows) and split.rows == list(range(len(rows)))
    assert split.source == str(sums_dir / "train.jsonl")
    for (ids, mask), row in zip(split.items, rows, strict=True):
        trained = toy_tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m])
        assert trained == row["reference"] + "<|im_end|>"
    unmasked = load_split(sums_dir / "train.jsonl", toy_tokenizer, 64, mask_prompt=False)
    assert all(m == [1] * len(ids) for ids, m in unmasked.items)


def test_mask_prompt_ignored_fault_trains_the_prompt(sums_dir, toy_tokenizer, plant_fault):
    plant_fault("mask_prompt_ignored")
    split = load_split(sums_dir / "train.jsonl", toy_tokenizer, 64, mask_prompt=True)
    assert all(mask == [1] * len(ids) for ids, mask in split.items)
    plant_fault()
    healthy = load_split(sums_dir / "train.jsonl", toy_tokenizer, 64, mask_prompt=True)
    assert all(0 < sum(mask) < len(ids) for ids, mask in healthy.items)


def test_rows_with_nothing_to_learn_are_dropped_and_bad_lines_named(tmp_path, sums_dir, toy_tokenizer):
    rows = read_jsonl(sums_dir / "train.jsonl")
    short = tmp_path / "short.jsonl"
    long_prompt = dict(rows[1], text="x " * 200 + rows[1]["text"])
    long_prompt["train_spans"] = [[s + 400, e + 400] for s, e in rows[1]["train_spans"]]
    short.write_text("".join(json.dumps(r) + "\n" for r in (rows[0], long_prompt, rows[2])) + "\n")
    split = load_split(short, toy_tokenizer, 64, mask_prompt=True)
    assert split.rows == [0, 2]  # the answer of line 2 lies beyond max_seq_length: nothing to learn
    assert all(len(ids) <= 64 for ids, _ in split.items)

    with pytest.raises(
        ValueError, match=rf"{short}: no usable examples after tokenization \(max_seq_length=8\)"
    ):
        load_split(short, toy_tokenizer, 8, mask_prompt=True)
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"prompt": "no text"}) + "\n")
    with pytest.raises(ValueError, match=rf"{bad}:2: not a prepared example"):
        load_split(bad, toy_tokenizer, 64, mask_prompt=True)
    bad.write_text("{torn\n")
    with pytest.raises(ValueError, match=rf"{bad}:1: not a prepared example"):
        load_split(bad, toy_tokenizer, 64, mask_prompt=True)


def test_record_tokens_keeps_ids_masks_and_row_numbers(tmp_path):
    data = TokenDataset([([i, i + 1], [0, 1]) for i in range(TOKENS_KEPT + 5)], "train.jsonl",
                        list(range(3, TOKENS_KEPT + 8)))  # fmt: skip
    record_tokens(data, tmp_path / "tokens.json")
    recorded = json.loads((tmp_path / "tokens.json").read_text())
    assert recorded["source"] == "train.jsonl" and len(recorded["rows"]) == TOKENS_KEPT
    assert recorded["rows"][0] == {"row": 3, "ids": [0, 1], "mask": [0, 1]}
    assert recorded["rows"][-1]["row"] == TOKENS_KEPT + 2
