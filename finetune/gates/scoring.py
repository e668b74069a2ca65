"""Scoring an answer against its reference: the measure behind the learning, held-out and runtime gates.

Short references (a name, a number) are right when matched exactly or contained as whole words. A long reference
(a sentence, a function body) is almost never reproduced word for word, so it is also scored by similarity:
ROUGE-L F1, the longest common subsequence of word and symbol tokens, which rewards the reference's content in
its order and is 1.0 only for the same token sequence.
"""

from __future__ import annotations

import re
import unicodedata

LONG_TOKENS = 12  # a reference of this many word/symbol tokens or more is graded by similarity
RIGHT_SIMILARITY = 0.6  # a long answer this similar to its reference counts as right (README, Gates)
MIN_GAIN = 0.1  # a fine-tuned answer improves on the base's when its score rises by at least this much
_TOKEN = re.compile(r"\w+|[^\w\s]")


def _normalize(text: str) -> str:
    text = " ".join(unicodedata.normalize("NFKC", text).lower().split())
    text = text.strip(" .,!?;:\"'`")
    return re.sub(r"^(the|a|an) ", "", text)


def tokens(text: str) -> list[str]:
    """Word and symbol tokens after NFKC and lower-casing: `return x[0]` -> return, x, [, 0, ]."""
    return _TOKEN.findall(unicodedata.normalize("NFKC", text).lower())


def _lcs(a: list[str], b: list[str]) -> int:
    row = [0] * (len(b) + 1)
    for x in a:
        prev = 0
        for j, y in enumerate(b, 1):
            prev, row[j] = row[j], prev + 1 if x == y else max(row[j], row[j - 1])
    return row[-1]


def similarity(answer: str, reference: str) -> float:
    """ROUGE-L F1 of the answer's tokens against the reference's, in [0, 1]."""
    got, ref = tokens(answer), tokens(reference)
    common = _lcs(got, ref) if got and ref else 0
    return 2 * common / (len(got) + len(ref)) if common else 0.0


def is_long(reference: str) -> bool:
    return len(tokens(reference)) >= LONG_TOKENS


def score_answer(answer: str, reference: str) -> dict[str, bool]:
    """exact: same after normalizing case/whitespace/edge punctuation/leading article; contains: whole-word match."""
    ref = _normalize(reference)
    if not ref:
        raise ValueError(f"reference {reference!r} is empty after normalization")
    ans = _normalize(answer)
    contains = re.search(rf"(?<!\w){re.escape(ref)}(?!\w)", ans) is not None
    return {"exact": ans == ref, "contains": contains}


def answer_score(answer: str, reference: str) -> float:
    """2 = exact, 1 = contains the reference as whole words; otherwise 0, or for a long reference its
    similarity (below 1 unless the tokens match, which counts as 1: the same content, laid out differently)."""
    score = score_answer(answer, reference)
    if score["exact"] or score["contains"]:
        return 2 if score["exact"] else 1
    return similarity(answer, reference) if is_long(reference) else 0


def right_score(score: float) -> bool:
    """An answer_score that counts as right: exact or contained (>= 1), or a long reference's similarity at
    RIGHT_SIMILARITY or more (a short reference scores 0, 1 or 2, so one bar serves both)."""
    return score >= RIGHT_SIMILARITY


def is_right(answer: str, reference: str) -> bool:
    return right_score(answer_score(answer, reference))


def improved(before: float, after: float) -> bool:
    """The fine-tuned answer's score beats the base's by MIN_GAIN (for short references: one whole grade)."""
    return after - before >= MIN_GAIN
