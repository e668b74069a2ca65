"""The generation budget comes from the run's own answers: long answers get room, a cap is stated."""

from __future__ import annotations

import json

from finetune.evaluate.budget import CAP, SERVE_MIN, answer_budget


class WordTokenizer:
    def encode(self, text, add_special_tokens=True):
        return text.split()


def _write(path, answers, key="conversation"):
    rows = [{key: [{"role": "user", "content": "q"}, {"role": "assistant", "content": a}]} for a in answers]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def test_the_budget_is_the_longest_answer_of_every_split_plus_a_margin(tmp_path):
    _write(tmp_path / "train.jsonl", ["one two", "a b c"])
    _write(tmp_path / "valid.jsonl", [" ".join(["w"] * 40)])
    _write(tmp_path / "heldout.jsonl", ["x"], key="messages")
    (tmp_path / "notes.jsonl").write_text(json.dumps({"text": " ".join(["z"] * 999)}) + "\n")  # not a split
    b = answer_budget(tmp_path, WordTokenizer())
    assert (b.longest_answer, b.tokens, b.answers, b.capped) == (41, 41 + 11, 4, False)  # 40 words + end
    assert b.serve_tokens == SERVE_MIN and b.to_dict()["rule"].startswith("longest + max(8, 0.25 x longest)")


def test_short_answers_get_the_minimum_margin_and_long_ones_are_capped_and_say_so(tmp_path):
    _write(tmp_path / "train.jsonl", ["42."])
    assert answer_budget(tmp_path, WordTokenizer()).tokens == 2 + 8
    _write(tmp_path / "train.jsonl", [" ".join(["w"] * 600)])
    b = answer_budget(tmp_path, WordTokenizer())
    assert b.tokens == CAP and b.capped and b.serve_tokens == 2 * 601


def test_raw_text_rows_have_no_answers(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "just text"}) + "\n")
    b = answer_budget(tmp_path, WordTokenizer())
    assert (b.longest_answer, b.answers) == (1, 0)
