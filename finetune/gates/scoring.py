"""Scoring an answer against its reference: the measure behind the learning and adapter-effect gates."""

from __future__ import annotations

import re
import unicodedata


def _normalize(text: str) -> str:
    text = " ".join(unicodedata.normalize("NFKC", text).lower().split())
    text = text.strip(" .,!?;:\"'`")
    return re.sub(r"^(the|a|an) ", "", text)


def score_answer(answer: str, reference: str) -> dict[str, bool]:
    """exact: same after normalizing case/whitespace/edge punctuation/leading article; contains: whole-word match."""
    ref = _normalize(reference)
    if not ref:
        raise ValueError(f"reference {reference!r} is empty after normalization")
    ans = _normalize(answer)
    contains = re.search(rf"(?<!\w){re.escape(ref)}(?!\w)", ans) is not None
    return {"exact": ans == ref, "contains": contains}


def answer_score(answer: str, reference: str) -> int:
    """2 = exact, 1 = contains the reference as whole words, 0 = neither."""
    score = score_answer(answer, reference)
    return 2 if score["exact"] else int(score["contains"])
