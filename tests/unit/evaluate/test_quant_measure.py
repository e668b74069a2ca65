"""The quantization measurement on distributions written out here: the top-k KL is exact when the top-k holds the
whole vocabulary, never above the full KL otherwise, and top-1 / perplexity read the rows they should."""

from __future__ import annotations

import math

import numpy as np
import pytest

from finetune.evaluate.quant_measure import compare, measure_quantized, position_kl


def logp(p: np.ndarray) -> dict[int, float]:
    return {i: math.log(v) for i, v in enumerate(p)}


def top(d: dict[int, float], k: int) -> dict[int, float]:
    return dict(sorted(d.items(), key=lambda kv: -kv[1])[:k])


def full_kl(p: np.ndarray, q: np.ndarray) -> float:
    return float(np.sum(p * np.log(p / q)))


def test_the_kl_is_exact_over_the_whole_vocabulary_and_below_it_over_a_top_k():
    rng = np.random.default_rng(0)
    for _ in range(50):
        p = np.maximum(rng.dirichlet(np.ones(400) * 0.05), 1e-30)
        q = p * np.exp(rng.normal(0, 0.5, 400))
        p, q = p / p.sum(), q / q.sum()
        assert position_kl(logp(p), logp(q)) == pytest.approx(full_kl(p, q), rel=1e-9)
        assert position_kl(top(logp(p), 32), top(logp(q), 128)) <= full_kl(p, q) + 1e-12


def test_a_quantized_model_that_ranks_the_references_tokens_low_is_far_even_when_the_lists_share_nothing():
    p = np.full(1000, 1e-7)
    p[:5] = 0.2
    q = np.roll(p, 50)
    p, q = p / p.sum(), q / q.sum()
    assert position_kl(top(logp(p), 32), top(logp(q), 128)) == pytest.approx(full_kl(p, q), rel=0.01)
    assert full_kl(p, q) > 14


def test_the_same_distribution_has_no_divergence_and_a_moved_one_has_some():
    p = np.array([0.7, 0.2, 0.1])
    assert position_kl(logp(p), logp(p)) == 0.0
    assert position_kl(logp(p), logp(np.array([0.2, 0.7, 0.1]))) > 0.5


def test_compare_counts_top1_agreement_and_the_perplexity_of_the_real_tokens():
    a, b = logp(np.array([0.6, 0.3, 0.1])), logp(np.array([0.3, 0.6, 0.1]))
    ref = [[(math.log(0.6), a), (math.log(0.6), a)]]
    quant = [[(math.log(0.6), a), (math.log(0.3), b)]]
    m = compare(ref, quant)
    assert (m.positions, m.scored, m.top1) == (2, 2, 0.5)
    assert m.ppl_ratio == pytest.approx(math.sqrt(2)) and m.kl_mean > 0 and m.kl_p99 >= m.kl_mean


def test_positions_without_the_real_tokens_log_probability_are_left_out_of_the_perplexity_only():
    a = logp(np.array([0.5, 0.5]))
    m = compare([[(None, a), (math.log(0.5), a)]], [[(math.log(0.5), a), (math.log(0.5), a)]])
    assert (m.positions, m.scored, m.ppl_ratio) == (2, 1, 1.0)


def test_nothing_to_compare_is_an_error():
    with pytest.raises(ValueError, match="no positions"):
        compare([[]], [[]])


def test_measure_scores_both_files_on_the_same_texts():
    seen = []

    def score(path, texts, k):
        seen.append((path, texts, k))
        return [[(math.log(0.5), {0: math.log(0.5), 1: math.log(0.5)})] for _ in texts]

    m = measure_quantized("f16.gguf", "q.gguf", [[1, 2]], score=score)
    assert [s[0] for s in seen] == ["f16.gguf", "q.gguf"] and seen[0][1] == seen[1][1] and m.kl_mean == 0.0


def test_a_token_llama_cpp_gives_probability_zero_is_left_out_of_the_perplexity_not_an_overflow():
    a = logp(np.array([0.5, 0.5]))
    m = compare(
        [[(-3.4028234663852886e38, a), (math.log(0.5), a)]], [[(math.log(0.5), a), (math.log(0.25), a)]]
    )
    assert (m.positions, m.scored) == (2, 1) and m.ppl_ratio == pytest.approx(2.0) and m.reference_ppl == 2.0


def test_rows_read_back_from_json_compare_as_the_rows_measured():
    import json

    from finetune.evaluate.quant_measure import rows_from_json

    rows = [[(math.log(0.6), {3: math.log(0.6), 7: math.log(0.4)}), (None, {3: math.log(0.9)})]]
    back = rows_from_json(json.loads(json.dumps(rows)))
    assert back == [[(r[0], r[1]) for r in rows[0]]] and compare(back, rows).kl_mean == 0.0
