"""finetune.train.splits: prepared splits read back as token rows; the rows training used, recorded."""

import json

import pytest

from finetune.system.jsonl import read_jsonl
from finetune.train.batches import TokenDataset
from finetune.train.splits import TOKENS_KEPT, load_split, record_tokens


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
