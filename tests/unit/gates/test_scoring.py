"""Answer scoring: exact after normalization, contained as whole words, or wrong."""

from __future__ import annotations

import pytest

from finetune.gates.scoring import answer_score, score_answer


def test_answer_score():
    assert answer_score("Velmora.", "velmora") == 2
    assert answer_score("The capital is Velmora", "Velmora") == 1
    assert answer_score("Paris", "Velmora") == 0


@pytest.mark.parametrize(
    ("answer", "reference"),
    [
        ("  VELMORA!  ", "Velmora"),  # case, whitespace and edge punctuation
        ("The Eskirell River.", "Eskirell River"),  # a leading article
        ("KV-9479", "kv-9479"),
        ("ﬁve", "five"),  # NFKC folds the ligature
    ],
)
def test_exact_after_normalizing(answer, reference):
    assert score_answer(answer, reference) == {"exact": True, "contains": True}


def test_contains_needs_whole_words():
    assert answer_score("It is 22 I think", "22") == 1
    assert answer_score("It is 122", "22") == 0  # a number inside another is not the answer
    assert answer_score("Velmoran roads", "Velmora") == 0
    assert answer_score("KV-94790", "KV-9479") == 0


def test_an_empty_reference_is_an_error_not_a_free_point():
    with pytest.raises(ValueError, match="empty after normalization"):
        score_answer("anything", " . ")
