"""The split-overlap gate: no row of the valid or test split is a training row by content.

The data stage drops exact duplicates; this judges what it wrote, by content: the message texts with case,
spacing and punctuation set aside, so "What is 7 times 6?" and "what is 7 times 6 ?" are one row.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from typing import Any

from finetune.gates.verdict import Verdict, verdict

HELD_OUT = ("valid", "test")


def content_key(row: Mapping[str, Any]) -> str:
    """A prepared row's content: its messages' words (its rendered text for a raw-text row), case folded."""
    conversation = row.get("conversation") or [{"content": row.get("text", "")}]
    return " ".join(re.findall(r"\w+", " ".join(str(m.get("content", "")) for m in conversation).casefold()))


def split_overlap(splits: Mapping[str, Sequence[Mapping[str, Any]]]) -> Verdict:
    """Held-out rows (valid, test) whose content is a training row's: none allowed."""
    name = "split_overlap"
    if not splits.get("train"):
        return verdict(name, False, None, 0, "no training rows to compare with")
    trained = {content_key(r) for r in splits["train"]}
    found = [
        f"{split}.jsonl row {i + 1}: {key[:60]!r}"
        for split in HELD_OUT
        for i, key in enumerate(map(content_key, splits.get(split) or []))
        if key in trained
    ]
    held = sum(len(splits.get(s) or []) for s in HELD_OUT)
    detail = f"{len(found)} of {held} valid/test rows are training rows"
    if found:
        detail += ": " + "; ".join(found[:3]) + (f" (+{len(found) - 3} more)" if len(found) > 3 else "")
    return verdict(name, not found, float(len(found)), 0, detail, {"overlapping": found[:20]})
