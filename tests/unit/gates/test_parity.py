"""Pure runtime comparisons: token ids, logprobs and greedy continuations of the same weights in two runtimes."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.gates.parity import (
    Answer,
    ParityResult,
    ReferenceRows,
    content_tokens,
    greedy_parity,
    logprob_parity,
    tokenizer_parity,
)
from finetune.serve.llamacpp import LlamaCppError

# ---------------------------------------------------------------- tokenizer parity


def test_tokenizer_parity_passes_on_identical_ids():
    r = tokenizer_parity(["a", "b"], [[1, 2], [3]], [[1, 2], [3]])
    assert r.ok and r.metrics["match_rate"] == 1.0 and r.problems == []


def test_tokenizer_parity_fails_and_points_at_the_first_difference():
    r = tokenizer_parity(["a b", "c"], [[1, 2, 3], [4]], [[1, 9, 3], [4]])
    assert not r.ok and r.metrics["match_rate"] == 0.5
    assert "at token 1" in r.problems[0] and "[2, 3]" in r.problems[0]


def test_tokenizer_parity_fails_on_a_shorter_candidate():
    r = tokenizer_parity(["abc"], [[1, 2, 3]], [[1, 2]])
    assert not r.ok and "at token 2" in r.problems[0] and "lengths 3/2" in r.problems[0]


def test_tokenizer_parity_fails_when_llamacpp_crashed():
    r = tokenizer_parity(["a"], [[1]], LlamaCppError("child exited with code -6 (SIGABRT)"))
    assert not r.ok and "SIGABRT" in r.problems[0] and r.metrics["match_rate"] == 0.0


def test_tokenizer_parity_refuses_lists_of_different_lengths():
    with pytest.raises(ValueError):
        tokenizer_parity(["a", "b"], [[1], [2]], [[1]])


# ---------------------------------------------------------------- logprob parity


def _logsoftmax(x):
    x = np.asarray(x, dtype=np.float64)
    return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)


def _top(row, k=3):
    ids = np.argsort(-row)[:k]
    return {int(i): float(row[i]) for i in ids}


def test_logprob_parity_passes_within_tolerance():
    ref = _logsoftmax(np.random.default_rng(0).normal(size=(5, 50)) * 3)
    cand = [{t: lp + 1e-4 for t, lp in _top(row).items()} for row in ref]
    r = logprob_parity(ref, cand, max_abs=1e-3)
    assert r.ok and r.metrics["top1_agreement"] == 1.0 and r.metrics["max_abs_diff"] == pytest.approx(1e-4)
    assert r.metrics["positions"] == 5.0


def test_logprob_parity_fails_on_a_large_difference_and_on_a_wrong_top1():
    ref = _logsoftmax(np.random.default_rng(1).normal(size=(4, 50)) * 3)
    cand = [_top(row) for row in ref]
    second = sorted(cand[2], key=cand[2].get)[-2]
    cand[2] = {second: 0.0}  # llama.cpp claims another token is certain
    r = logprob_parity(ref, cand, max_abs=1e-2)
    assert not r.ok and r.metrics["top1_agreement"] == 0.75
    assert any("max |logprob diff|" in p and "position 2" in p for p in r.problems)
    assert any("top-1 agreement 75.0%" in p for p in r.problems)


def test_logprob_parity_treats_a_near_tie_within_tolerance_as_agreement():
    ref = np.log(np.array([[0.5 + 1e-5, 0.5 - 1e-5]]))
    r = logprob_parity(ref, [{1: float(ref[0, 1]), 0: float(ref[0, 1])}], max_abs=1e-3)
    assert r.ok and r.metrics["top1_agreement_tol"] == 1.0 and r.metrics["top1_agreement"] == 0.0


def test_logprob_parity_tie_margin_is_separate_from_max_abs():
    ref = np.log(
        np.array([[0.52, 0.48]])
    )  # a 0.08 gap: a tie for a loose margin, a real choice for a tight one
    cand = [{1: float(ref[0, 0]), 0: float(ref[0, 1])}]  # llama.cpp swapped the two
    assert not logprob_parity(ref, cand, max_abs=1.0, tie_margin=0.01).ok
    assert logprob_parity(ref, cand, max_abs=1.0, tie_margin=0.1).ok


def test_logprob_parity_min_top1_allows_some_disagreement():
    ref = _logsoftmax(np.random.default_rng(2).normal(size=(4, 20)) * 3)
    cand = [_top(row) for row in ref]
    first, second = sorted(cand[0], key=cand[0].get)[-1], sorted(cand[0], key=cand[0].get)[-2]
    cand[0] = {**cand[0], first: cand[0][second], second: cand[0][first]}  # a top-1 flip, each within max_abs
    gap = float(ref[0, first] - ref[0, second])
    assert not logprob_parity(ref, cand, max_abs=gap + 1e-6, tie_margin=0.0).ok
    assert logprob_parity(ref, cand, max_abs=gap + 1e-6, tie_margin=0.0, min_top1=0.75).ok


def test_logprob_parity_is_two_sided_a_reference_top_token_llamacpp_leaves_out_fails():
    ref = _logsoftmax(np.random.default_rng(3).normal(size=(3, 30)) * 3)
    cand = [_top(row, k=4) for row in ref]
    third = sorted(cand[1], key=cand[1].get)[-3]
    del cand[1][third]  # what llama.cpp lists is exact, but a likely token is missing from its list
    r = logprob_parity(ref, cand, max_abs=1e-3)
    assert not r.ok and r.metrics["reference_top_missed"] == 1.0
    assert any("missing from llama.cpp's top-k" in p for p in r.problems)
    assert logprob_parity(ref, cand, max_abs=1e-3, ref_k=2).ok  # only the top two are required
    rows = ReferenceRows.from_full(ref, cand, 5)  # the sparse form judges the same
    assert logprob_parity(rows, cand, max_abs=1e-3).metrics == r.metrics


def test_logprob_parity_fails_on_shape_mismatch_or_an_empty_row():
    ref = _logsoftmax(np.zeros((3, 10)))
    r = logprob_parity(ref, [{0: -2.3}] * 2, max_abs=1.0)
    assert not r.ok and "shape mismatch" in r.problems[0]
    r = logprob_parity(ref, [{0: float(ref[0, 0])}, {}, {0: float(ref[2, 0])}], max_abs=1.0)
    assert not r.ok and "position 1: llama.cpp returned no logprobs" in r.problems[0]


# ---------------------------------------------------------------- greedy parity and answers


def test_greedy_parity():
    assert greedy_parity([[1, 2, 3]], [[1, 2, 3]]).ok
    r = greedy_parity([[1, 2, 3], [5]], [[1, 2, 4], [5]])
    assert not r.ok and "diverge at step 2" in r.problems[0] and r.metrics["greedy_match_rate"] == 0.5


def test_greedy_parity_counts_a_longer_continuation_as_divergence():
    r = greedy_parity([[1, 2]], [[1, 2, 3]])
    assert not r.ok and "diverge at step 2" in r.problems[0]


def test_greedy_parity_min_match_tolerates_a_share():
    r = greedy_parity([[1], [2], [3], [4]], [[1], [2], [3], [9]], min_match=0.75)
    assert r.ok and r.problems == [] and r.metrics["greedy_match_rate"] == 0.75


def test_content_tokens_stop_at_the_first_end_token():
    assert content_tokens([5, 6, 2, 4], {2}) == [5, 6]
    assert content_tokens([5, 6], {2}) == [5, 6]
    assert content_tokens([2, 5], {2, 7}) == []


def test_answer_to_dict_and_parity_result_defaults():
    a = Answer("Velmora.", "stop", [5, 6, 2], 12)
    assert a.to_dict() == {
        "text": "Velmora.",
        "finish_reason": "stop",
        "tokens": [5, 6, 2],
        "prompt_tokens": 12,
        "rendered": None,
    }
    assert Answer("x", "length").tokens is None
    assert ParityResult(True, []).metrics == {}
