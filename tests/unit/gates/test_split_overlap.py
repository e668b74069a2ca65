"""The split-overlap gate: valid/test rows that are training rows by content fail it."""

from __future__ import annotations

from finetune.gates.split_overlap import content_key, split_overlap


def chat(q: str, a: str) -> dict:
    return {"conversation": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


TRAIN = [chat("What is 7 times 6?", "42."), chat("What is the capital of Velmora?", "Zorholm.")]


def test_disjoint_splits_pass():
    v = split_overlap(
        {"train": TRAIN, "valid": [chat("What is 8 times 6?", "48.")], "test": [chat("Hi", "Hello")]}
    )
    assert v.passed and v.measured == 0 and v.threshold == 0 and "0 of 2 valid/test rows" in v.detail


def test_a_held_out_row_that_is_a_training_row_up_to_case_spacing_and_punctuation_fails():
    leaked = chat("what is 7 times 6 ?", "42")
    v = split_overlap({"train": TRAIN, "valid": [chat("What is 8 times 6?", "48.")], "test": [leaked]})
    assert not v.passed and v.measured == 1 and "test.jsonl row 1: 'what is 7 times 6 42'" in v.detail


def test_raw_text_rows_are_compared_by_their_text():
    assert content_key({"text": "Once upon a time."}) == content_key({"text": "once upon a  time"})


def test_no_training_rows_is_a_failure():
    assert not split_overlap({"train": [], "valid": TRAIN}).passed
