"""Answer scoring: exact after normalization, contained as whole words, or wrong."""

from __future__ import annotations

import pytest

from finetune.gates.scoring import answer_score, improved, is_long, is_right, score_answer, similarity


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


CODE = "    if n < 2:\n        return False\n    for k in range(2, n):\n        if n % k == 0:\n            return False\n    return True\n"


def test_a_long_reference_is_graded_by_token_similarity():
    assert is_long(CODE) and not is_long("Velmora")
    assert similarity(CODE, CODE) == 1.0
    assert answer_score(CODE.replace("    ", "\t"), CODE) == 2  # whitespace is layout, not content
    one_line_off = CODE.replace("n % k == 0", "n % k != 0")
    assert 0.9 < answer_score(one_line_off, CODE) < 1 and is_right(one_line_off, CODE)
    prose = "Sure! Here is a function that checks whether a number is prime."
    assert answer_score(prose, CODE) < 0.2 and not is_right(prose, CODE)


def test_rouge_l_counts_the_longest_common_subsequence():
    # a b c d vs a c e: LCS "a c" = 2 of 4 + 3 tokens -> F1 = 4/7
    assert similarity("a b c d", "a c e") == pytest.approx(4 / 7)
    assert similarity("", "a c e") == 0.0 and similarity("x y", "a c e") == 0.0


def test_a_short_reference_is_never_graded():
    assert answer_score("Velmorra", "Velmora") == 0 and not is_right("Velmorra", "Velmora")


def test_improvement_needs_a_real_gain():
    assert improved(0, 1) and improved(1, 2) and improved(0.40, 0.55)
    assert not improved(0.50, 0.55) and not improved(1, 1) and not improved(2, 1)
