"""The label-mask gate: only the answers carry loss (mask_prompt on), every token does (off).

Hand-made rows first, then the token ids and masks training really recorded (train/engine.record_tokens),
with and without the mask_prompt_ignored and end_marker_untrained faults planted in the split loader.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from finetune.gates.label_mask import MaskedRow, label_mask

END = ["<|im_end|>"]  # the chatml end marker the template trains after each answer


def row(runs, answers, *, n_tokens=20, n_masked=None, truncated=False, i=0):
    n_masked = sum(len(r) for r in runs) if n_masked is None else n_masked
    return MaskedRow(i, list(runs), list(answers), n_tokens, n_masked, truncated)


def test_answers_only_passes():
    rows = [row(["8<|im_end|>"], ["8"]), row(["Velmora.<|im_end|>", "22<|im_end|>"], ["Velmora.", "22"], i=1)]
    v = label_mask(rows, mask_prompt=True, end_markers=END)
    assert v.passed and v.measured == 1.0 and "2/2 rows train answers only" in v.detail


def test_a_trained_prompt_fails():
    # mask_prompt ignored: one run from the first target token to the end, starting with the question
    bad = row(["user\nWhat is 2 + 6?<|im_end|>\n<|im_start|>assistant\n8<|im_end|>"], ["8"], i=3)
    v = label_mask([row(["9<|im_end|>"], ["9"]), bad], mask_prompt=True, end_markers=END)
    assert not v.passed and v.measured == 0.5
    assert "row 3: trained 'user\\nWhat is 2 + 6?" in v.detail and v.data["problems"][0].startswith("row 3")


def test_an_untrained_answer_fails():
    v = label_mask([row(["Velmora.<|im_end|>"], ["Velmora.", "22"])], mask_prompt=True, end_markers=END)
    assert not v.passed and "1 trained spans for 2 answers" in v.detail


def test_a_run_that_is_not_the_answer_fails():
    v = label_mask([row(["Paris<|im_end|>"], ["Velmora"])], mask_prompt=True, end_markers=END)
    assert not v.passed and "the answer is 'Velmora'" in v.detail


def test_a_later_turns_prompt_trained_with_the_answer_before_it_fails():
    # Two turns, two runs, each starting with its answer: but the first run goes on through the second
    # question, so prompt text is trained. The gate promises each run holds only its answer + end marker.
    spilled = "Velmora.<|im_end|>\n<|im_start|>user\nAnd what is 12 + 10?<|im_end|>\n<|im_start|>assistant\n"
    v = label_mask([row([spilled, "22<|im_end|>"], ["Velmora.", "22"])], mask_prompt=True, end_markers=END)
    assert not v.passed, v.detail


def test_an_answer_without_its_end_marker_fails_unless_the_row_was_cut():
    # a model whose end-of-turn marker never carried loss does not learn to stop
    v = label_mask([row(["8<|im_end|>"], ["8"]), row(["9"], ["9"], i=1)], mask_prompt=True, end_markers=END)
    assert not v.passed and v.measured == 0.5 and "row 1: trained '9', the answer is '9'" in v.detail
    assert label_mask([row(["9"], ["9"], truncated=True)], mask_prompt=True, end_markers=END).passed
    assert not label_mask([row(["9<|im_end|><|im_end|>"], ["9"])], mask_prompt=True, end_markers=END).passed


def test_a_row_cut_inside_its_answer_passes_only_when_truncated():
    assert label_mask([row(["Velm"], ["Velmora"], truncated=True)], mask_prompt=True, end_markers=END).passed
    assert not label_mask([row(["Velm"], ["Velmora"])], mask_prompt=True, end_markers=END).passed
    # truncation may also drop whole later answers
    assert label_mask(
        [row(["Velmora<|im_end|>"], ["Velmora", "22"], truncated=True)], mask_prompt=True, end_markers=END
    ).passed


def test_mask_prompt_off_needs_every_token_after_the_first():
    assert label_mask(
        [row(["x"], ["8"], n_tokens=20, n_masked=19)], mask_prompt=False, end_markers=END
    ).passed
    v = label_mask([row(["8<|im_end|>"], ["8"], n_tokens=20, n_masked=2)], mask_prompt=False, end_markers=END)
    assert not v.passed and "2/20 tokens trained, expected all" in v.detail


def test_raw_text_rows_train_every_token_even_with_mask_prompt_on():
    assert label_mask(
        [row(["a text"], [], n_tokens=10, n_masked=9)], mask_prompt=True, end_markers=END
    ).passed
    assert not label_mask(
        [row(["text"], [], n_tokens=10, n_masked=4)], mask_prompt=True, end_markers=END
    ).passed


def test_no_rows_is_a_failure():
    v = label_mask([], mask_prompt=True, end_markers=END)
    assert not v.passed and "no recorded training rows" in v.detail


def test_many_problems_are_summarized():
    rows = [row(["Paris"], ["Velmora"], i=i) for i in range(5)]
    v = label_mask(rows, mask_prompt=True, end_markers=END)
    assert "(+2 more)" in v.detail and len(v.data["problems"]) == 5 and v.measured == 0.0


# ---------------------------------------------------------------- what training recorded

MULTI_TURN = [
    {"messages": [{"role": "user", "content": f"What is {a} + 3?"}, {"role": "assistant", "content": str(a + 3)},
                  {"role": "user", "content": f"And {a} + 4?"}, {"role": "assistant", "content": str(a + 4)}]}
    if a % 2 else
    {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": f"What is {a} + 7?"},
                  {"role": "assistant", "content": str(a + 7)}]}
    for a in range(2, 14)
]  # fmt: skip


def _recorded(tmp_path: Path, data_dir: Path, tokenizer, max_seq_length: int = 64) -> Path:
    """A run dir holding data/ and train_tokens.json exactly as train_run writes them."""
    from finetune.train.engine import TOKENS, record_tokens
    from finetune.train.splits import load_split

    run = tmp_path / "run"
    shutil.copytree(data_dir, run / "data")
    dataset = load_split(run / "data" / "train.jsonl", tokenizer, max_seq_length, True)
    record_tokens(dataset, run / TOKENS)
    return run


def _judge(run: Path, tokenizer, max_seq_length: int = 64):
    from finetune.evaluate.run_measurements import masked_rows

    return label_mask(masked_rows(run, tokenizer, max_seq_length), mask_prompt=True, end_markers=END)


def test_recorded_training_rows_pass(tmp_path, sums_dir, toy_tokenizer):
    v = _judge(_recorded(tmp_path, sums_dir, toy_tokenizer), toy_tokenizer)
    n = len(sums_dir.joinpath("train.jsonl").read_text().splitlines())
    assert v.passed and f"{n}/{n} rows train answers only" in v.detail, v.detail


def test_recorded_rows_with_the_prompt_trained_fail(tmp_path, sums_dir, toy_tokenizer, plant_fault):
    plant_fault("mask_prompt_ignored")
    run = _recorded(tmp_path, sums_dir, toy_tokenizer)
    plant_fault()
    v = _judge(run, toy_tokenizer)
    assert not v.passed and v.measured == 0.0 and "trained 'user\\nWhat is" in v.detail


def test_recorded_rows_whose_end_marker_carried_no_loss_fail(tmp_path, sums_dir, toy_tokenizer, plant_fault):
    plant_fault("end_marker_untrained")
    run = _recorded(tmp_path, sums_dir, toy_tokenizer)
    plant_fault()
    v = _judge(run, toy_tokenizer)
    assert not v.passed and v.measured == 0.0 and "<|im_end|>" not in v.detail.split("; ", 1)[1], v.detail


@pytest.fixture
def multi_turn_dir(tmp_path, toy_tokenizer) -> Path:
    from finetune.data.prepare import prepare

    src = tmp_path / "chats.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in MULTI_TURN))
    prepare(src, tmp_path / "prepared", template="chatml", tokenizer=toy_tokenizer, max_seq_length=96)
    return tmp_path / "prepared"


def test_recorded_multi_turn_rows_train_every_answer(tmp_path, multi_turn_dir, toy_tokenizer):
    from finetune.evaluate.run_measurements import masked_rows

    run = _recorded(tmp_path, multi_turn_dir, toy_tokenizer, 96)
    rows = masked_rows(run, toy_tokenizer, 96)
    two_turns = [r for r in rows if len(r.answers) == 2]
    assert two_turns and all(len(r.runs) == 2 for r in two_turns)
    for r in two_turns:  # each run is exactly its answer and the end token
        assert [run.strip() for run in r.runs] == [f"{a}<|im_end|>" for a in r.answers]
    assert label_mask(rows, mask_prompt=True, end_markers=END).passed
