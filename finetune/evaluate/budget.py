"""How many tokens an answer may take: derived from the run's own data, for the evaluation's runtimes and for
the served Modelfile's `num_predict`, so a long-answer dataset is neither cut short nor left to run on."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from finetune.system.jsonl import read_jsonl

SPLITS = ("train.jsonl", "valid.jsonl", "test.jsonl", "heldout.jsonl")
MARGIN = 0.25  # a fine-tuned answer may be a little longer than its reference
MIN_EXTRA = 8
CAP = 512  # the longest budget the evaluation spends on one answer (24 prompts x 5 runtimes on 2 cores)
# What a served model may say to one request (its Modelfile's num_predict): room beyond the data's answers for
# users' own questions, yet bounded, so a model that never stops cannot run on until its context fills.
SERVE_MIN = 256


@dataclass(frozen=True)
class Budget:
    longest_answer: int  # tokens of the longest reference answer, its end marker included
    tokens: int  # the generation budget: longest + max(MIN_EXTRA, MARGIN x longest), at most CAP
    answers: int  # how many answers were measured
    capped: bool  # the data's answers are longer than CAP

    @property
    def serve_tokens(self) -> int:
        """num_predict for the served model: max(SERVE_MIN, 2 x the longest answer)."""
        return max(SERVE_MIN, 2 * self.longest_answer)

    def to_dict(self) -> dict[str, Any]:
        rule = f"longest + max({MIN_EXTRA}, {MARGIN:g} x longest), at most {CAP}"
        return asdict(self) | {"rule": rule, "serve_tokens": self.serve_tokens}


def _answers(data_dir: Path) -> list[str]:
    out = []
    for name in SPLITS:
        path = data_dir / name
        if not path.is_file():
            continue
        for row in read_jsonl(path):
            turns = row.get("conversation") or row.get("messages") or []
            out += [t["content"] for t in turns if t.get("role") == "assistant" and t.get("content")]
    return out


def answer_budget(data_dir: Path, tokenizer: Any) -> Budget:
    """The budget for the prepared splits in data_dir (raw-text rows have no answers and count nothing)."""
    answers = _answers(Path(data_dir))
    longest = max((len(tokenizer.encode(a, add_special_tokens=False)) for a in answers), default=0) + 1
    wanted = longest + max(MIN_EXTRA, math.ceil(MARGIN * longest))
    return Budget(longest, min(wanted, CAP), len(answers), wanted > CAP)
