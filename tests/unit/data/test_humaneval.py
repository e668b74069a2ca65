"""The long-answer set's builder: which HumanEval rows it keeps, and the committed file's shape."""

from __future__ import annotations

import json
from pathlib import Path

from finetune.data.humaneval import ANSWER_TOKENS, INSTRUCTION, ROW_TOKENS, rows
from finetune.data.records import load_records

DATA = Path(__file__).resolve().parents[3] / "data" / "humaneval_long.jsonl"


def task(i: int, body_words: int, prompt_words: int = 10) -> dict:
    return {
        "task_id": f"HumanEval/{i}",
        "prompt": "p " * prompt_words,
        "canonical_solution": "w " * body_words,
    }


def test_rows_keep_answers_in_range_whose_row_fits_the_context():
    words = lambda text: len(text.split())  # noqa: E731 - one token per word
    tasks = [task(0, 39), task(1, 40), task(2, 150), task(3, 151), task(4, 100, ROW_TOKENS - 100)]
    kept = rows(tasks, words)
    assert [r["task_id"] for r in kept] == ["HumanEval/1", "HumanEval/2"]  # 4: prompt + instruction too long
    assert kept[0] == {"prompt": INSTRUCTION + "p " * 10, "completion": "w " * 39 + "w\n",
                       "task_id": "HumanEval/1", "answer_tokens": 40}  # fmt: skip


def test_the_committed_file_is_prompt_completion_rows_with_long_answers():
    committed = [json.loads(line) for line in DATA.read_text(encoding="utf-8").splitlines()]
    assert len(committed) == 51 and len({r["task_id"] for r in committed}) == 51
    assert all(ANSWER_TOKENS[0] <= r["answer_tokens"] <= ANSWER_TOKENS[1] for r in committed)
    assert all(r["prompt"].startswith(INSTRUCTION) and r["completion"].endswith("\n") for r in committed)
    loaded = load_records(DATA)
    assert len(loaded.examples) == 51 and not loaded.rejected
