"""The one MLX decoder on the tiny Llama: batched greedy == one at a time, logprobs, teacher-forced loss."""

from __future__ import annotations

import numpy as np
import pytest

from finetune.evaluate import decode
from tests import noise

PROMPTS = [
    "<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n",
    "<|im_start|>user\nName the capital of Zorbania, please, in one word.<|im_end|>\n<|im_start|>assistant\n",
    "Hello",
    "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi!<|im_end|>\n<|im_start|>assistant\n",
    "Digits 0 12 345 6789",
]


def _reference_greedy(model, ids: list[int], max_tokens: int, eos: set[int]) -> list[int]:
    """Full recompute at every step: slow, but obviously right."""
    out: list[int] = []
    for _ in range(max_tokens):
        nxt = int(np.argmax(decode.logprobs(model, ids + out)[-1]))
        out.append(nxt)
        if nxt in eos:
            break
    return out


def test_batched_greedy_equals_one_prompt_at_a_time(tiny_model):
    model, tok = tiny_model
    batched = decode.greedy(model, tok, PROMPTS, max_tokens=8, batch_size=8)
    single = decode.greedy(model, tok, PROMPTS, max_tokens=8, batch_size=1)
    assert [a.tokens for a in batched] == [a.tokens for a in single]
    assert batched == single
    uneven = decode.greedy(model, tok, PROMPTS, max_tokens=8, batch_size=2)  # a last, smaller batch
    assert uneven == single


def test_greedy_equals_a_full_recompute_argmax(tiny_model):
    model, tok = tiny_model
    eos = set(tok.eos_token_ids)
    answers = decode.greedy(model, tok, PROMPTS[:3], max_tokens=6)
    for prompt, answer in zip(PROMPTS[:3], answers, strict=True):
        ids = decode.prompt_ids(tok, prompt)
        assert answer.tokens == _reference_greedy(model, ids, 6, eos)
        assert answer.prompt_tokens == len(ids)


def test_greedy_answers_are_decoded_and_bounded(tiny_model):
    model, tok = tiny_model
    for a in decode.greedy(model, tok, PROMPTS, max_tokens=5):
        assert 1 <= len(a.tokens) <= 5
        ended = a.tokens[-1] in tok.eos_token_ids
        assert a.finish_reason == ("stop" if ended else "length")
        content = a.tokens[:-1] if ended else a.tokens
        assert a.text == tok.decode(content).strip()


def test_greedy_cuts_the_text_at_a_stop_string(tiny_model):
    model, tok = tiny_model
    # random weights: some prompts only get newlines (stripped to ""); take one with visible text
    prompt, free = next((p, a) for p, a in zip(PROMPTS, decode.greedy(model, tok, PROMPTS, max_tokens=8),
                                              strict=True) if len(a.text) >= 3)  # fmt: skip
    stop = free.text[2:4]
    cut = decode.greedy(model, tok, [prompt], max_tokens=8, stops=[stop])[0]
    assert cut.finish_reason == "stop" and stop not in cut.text and free.text.startswith(cut.text)
    assert cut.tokens == free.tokens  # the tokens are what was generated; only the text is cut


def test_cut_at_stops():
    assert decode.cut_at_stops("Velmora.<|im_end|>more", ["<|im_end|>"]) == ("Velmora.", True)
    assert decode.cut_at_stops("a STOP b END", ["END", "STOP"]) == ("a ", True)  # the earliest wins
    assert decode.cut_at_stops("Velmora.", ["<|im_end|>", ""]) == ("Velmora.", False)


def test_prompt_ids_add_bos_only_when_the_prompt_lacks_it(tiny_model):
    _, tok = tiny_model
    assert decode.prompt_ids(tok, "Hello") == list(tok.encode("Hello"))
    bos = tok.bos_token
    if bos is None:
        pytest.skip("this tokenizer has no BOS token")
    with_bos = decode.prompt_ids(tok, bos + "Hello")
    assert with_bos.count(tok.bos_token_id) == 1  # never a doubled BOS


def test_logprobs_are_a_normalized_log_softmax_of_the_logits(tiny_model):
    import mlx.core as mx

    model, tok = tiny_model
    ids = decode.prompt_ids(tok, PROMPTS[0])
    lp = decode.logprobs(model, ids)
    assert lp.shape == (len(ids), model.args.vocab_size) and lp.dtype == np.float32
    logits = np.array(model(mx.array([ids]))[0].astype(mx.float32), dtype=np.float64)
    exact = logits - logits.max(-1, keepdims=True)
    exact -= np.log(np.exp(exact).sum(-1, keepdims=True))  # log-softmax in float64 of the same logits
    # floor: the same log-softmax rounded to float32 in another order (numpy's); no BLAS in between
    lse = np.log(np.exp(logits.astype(np.float32)).sum(-1, keepdims=True, dtype=np.float32))
    floor = noise.rel_max(logits.astype(np.float32) - lse, exact)
    noise.within("logprobs vs float64 log-softmax", noise.rel_max(lp, exact), floor, 8)
    assert abs(np.exp(lp.astype(np.float64)).sum(-1) - 1).max() < 1e-3  # normalized (not a bare logit shift)
    # causal: a prefix sees the same rows; another length is another reassociation of the model's matmuls
    with noise.as_float64(model):
        floor = noise.rel_max(lp[:4], decode.logprobs(model, ids[:4]).astype(np.float64))
    noise.within("logprobs of a prefix", noise.rel_max(decode.logprobs(model, ids[:4]), lp[:4]), floor, 8)


def test_logits_at_runs_the_head_only_where_asked_and_equals_the_models_own(tiny_model):
    import mlx.core as mx

    from finetune.train.arch import arch_of

    model, tok = tiny_model
    ids = decode.prompt_ids(tok, PROMPTS[1])
    full = np.array(model(mx.array([ids]))[0, 5:9].astype(mx.float32))
    assert arch_of(model) is not None  # the tiny Llama goes through finetune.train.arch
    got = np.array(decode.logits_at(model, ids, 5, 4).astype(mx.float32))
    with noise.as_float64(model):  # floor: the same rows in float64
        floor = noise.rel_max(full, np.array(model(mx.array([ids]))[0, 5:9]))
    assert got.shape == full.shape == (4, model.args.vocab_size)
    noise.within("logits at positions 5..8 vs the model's own", noise.rel_max(got, full), floor, 4)

    class Unknown:  # no adapter for its architecture: the model's own forward, sliced
        def __call__(self, x):
            return model(x)

    assert np.array_equal(np.array(decode.logits_at(Unknown(), ids, 5, 4).astype(mx.float32)), full)


def test_text_nll_is_the_mean_negative_log_likelihood_of_each_next_token(tiny_model):
    model, tok = tiny_model
    texts = ["The quick brown fox.", "Water flows downhill to the sea."]
    by_hand = []
    for text in texts:
        ids = list(tok.encode(text))
        lp = decode.logprobs(model, ids)
        by_hand += [-float(lp[i, ids[i + 1]]) for i in range(len(ids) - 1)]
    assert decode.text_nll(model, tok, texts) == pytest.approx(sum(by_hand) / len(by_hand), rel=1e-6)
    assert decode.text_nll(model, tok, texts[:1]) != pytest.approx(decode.text_nll(model, tok, texts[1:]))


def test_teacher_forced_loss_is_the_mean_masked_cross_entropy(tiny_model, tiny_sums_dir):
    from finetune.train.splits import load_split

    model, tok = tiny_model
    dataset = load_split(tiny_sums_dir / "train.jsonl", tok, 64, True)
    dataset.items, dataset.rows = dataset.items[:6], dataset.rows[:6]
    loss = decode.teacher_forced_loss(model, dataset, 2, 64)
    total, count = 0.0, 0
    for ids, mask in dataset.items:  # by hand: -log p(target) over the masked positions
        lp = decode.logprobs(model, ids)
        for t in range(1, len(ids)):
            if mask[t]:
                total -= float(lp[t - 1, ids[t]])
                count += 1
    with noise.as_float64(model):
        exact = decode.teacher_forced_loss(model, dataset, 2, 64)
    floor = abs(loss - exact) / exact  # the float32 loss's own rounding
    noise.within("teacher-forced loss vs by hand", abs(loss - total / count) / loss, floor, 8)
    other = decode.teacher_forced_loss(model, dataset, 6, 64)  # batch-size free: another summation order
    noise.within("teacher-forced loss, batch 6 vs 2", abs(other - loss) / loss, floor, 8)


def test_load_with_an_adapter_changes_the_answers(tiny_hf, tiny_lora, tiny_model):
    model, tok = tiny_model
    tuned, _ = decode.load(tiny_hf, tiny_lora)
    try:
        base_lp = decode.logprobs(model, decode.prompt_ids(tok, PROMPTS[0]))
        tuned_lp = decode.logprobs(tuned, decode.prompt_ids(tok, PROMPTS[0]))
        assert np.abs(base_lp - tuned_lp).max() > 0.1
        assert not tuned.training  # loaded in eval mode
    finally:
        decode.release(tuned)
