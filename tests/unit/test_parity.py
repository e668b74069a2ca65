"""Tier 3 gates: each fails on a broken input (lost adapter, drifting runtime, runaway answer) and passes
on a healthy one."""

from __future__ import annotations

import pytest

from finetune.llamacpp import ParityResult
from finetune.parity import (
    Answer,
    adapter_effect,
    clean_endings,
    content_tokens,
    logprob_gate,
    output_parity,
    tokenizer_gate,
)

REFS = ["Velmora", "22", "The Eskirell River", "KV-9479"]
EOS = 2


def ans(texts, *, reason="stop", tokens=True):
    return [Answer(t, reason, [len(w) for w in t.split()] + [EOS] if tokens else None) for t in texts]


TRAINED = [f"{r}." for r in REFS]
BASE = ["The capital is Paris.", "To solve this, first", "The Nile.", "A secret code is a cipher"]


# ---------------------------------------------------------------- output parity


def test_output_parity_passes_when_every_runtime_agrees():
    answers = {"mlx_adapter": ans(TRAINED), "mlx_fused": ans(TRAINED), "llamacpp": ans(TRAINED),
               "ollama": ans(TRAINED, tokens=False)}  # fmt: skip
    v = output_parity(answers, reference="mlx_adapter", end_ids={EOS},
                      thresholds={"mlx_fused": 0.9, "llamacpp": 0.9, "ollama": 0.9})  # fmt: skip
    assert v.passed, v.detail
    assert v.data["rates"]["llamacpp"] == {"text": 1.0, "tokens": 1.0}
    assert "tokens" not in v.data["rates"]["ollama"]  # Ollama reports text only


def test_output_parity_fails_when_a_runtime_drifts_past_the_threshold():
    drifted = [*TRAINED[:2], "Velmora River.", "KV-9497."]
    answers = {"mlx_adapter": ans(TRAINED), "mlx_fused": ans(TRAINED), "llamacpp": ans(drifted)}
    v = output_parity(answers, reference="mlx_adapter", thresholds={"mlx_fused": 0.9, "llamacpp": 0.9})
    assert not v.passed
    assert v.measured == 0.5 and "llamacpp: agreement 50%" in v.detail and "prompt 2" in v.detail


def test_output_parity_threshold_zero_reports_without_requiring():
    answers = {"mlx_adapter": ans(TRAINED), "llamacpp": ans(BASE)}
    assert output_parity(answers, reference="mlx_adapter", thresholds={"llamacpp": 0.0}).passed


def test_output_parity_compares_tokens_without_the_ending_token():
    ref = [Answer("Velmora.", "stop", [5, 6, EOS])]
    cpp = [Answer("Velmora.", "stop", [5, 6])]  # a runtime that leaves the end token out
    other = [Answer("Velmora.", "stop", [5, 7, EOS])]  # same text, other ids: a tokenizer problem
    assert output_parity({"a": ref, "c": cpp}, reference="a", thresholds={"c": 1.0}, end_ids={EOS}).passed
    v = output_parity({"a": ref, "c": other}, reference="a", thresholds={"c": 1.0}, end_ids={EOS})
    assert not v.passed and v.data["rates"]["c"] == {"text": 1.0, "tokens": 0.0}
    assert content_tokens([5, 6, EOS, 4], {EOS}) == [5, 6]


def test_output_parity_fails_on_a_runtime_that_crashed_or_is_missing():
    answers = {"mlx_adapter": ans(TRAINED), "mlx_fused": ans(TRAINED)}
    v = output_parity(answers, reference="mlx_adapter", thresholds={"mlx_fused": 0.9, "llamacpp": 0.9},
                      errors={"llamacpp": "LlamaCppError: child exited with code -6"})  # fmt: skip
    assert not v.passed and "code -6" in v.detail
    v = output_parity(answers, reference="mlx_adapter", thresholds={"ollama": 0.9})
    assert not v.passed and "ollama: 0 answers" in v.detail
    assert not output_parity({}, reference="mlx_adapter", thresholds={}).passed


# ---------------------------------------------------------------- adapter effect


def test_adapter_effect_passes_when_every_runtime_gives_trained_answers():
    v = adapter_effect(ans(BASE), {"mlx_adapter": ans(TRAINED), "mlx_fused": ans(TRAINED)}, REFS)
    assert v.passed, v.detail
    assert v.measured == 1.0 and v.data["base_score"] == 0.0


def test_adapter_effect_fails_when_the_lora_scale_was_lost():
    # scale 0 (or an adapter never loaded): the "fine-tuned" model answers exactly like the base
    v = adapter_effect(ans(BASE), {"mlx_adapter": ans(BASE)}, REFS)
    assert not v.passed and "0% of answers differ" in v.detail


def test_adapter_effect_fails_when_the_fuse_dropped_the_adapter():
    v = adapter_effect(
        ans(BASE), {"mlx_adapter": ans(TRAINED), "mlx_fused": ans(BASE), "ollama": ans(BASE)}, REFS
    )
    assert not v.passed
    assert "mlx_fused" in v.detail and "ollama" in v.detail and "mlx_adapter:" not in v.detail


def test_adapter_effect_fails_when_answers_change_but_are_wrong():
    wrong = ["Zorport.", "23.", "The Teviash River.", "KV-0000."]
    v = adapter_effect(ans(BASE), {"mlx_adapter": ans(wrong)}, REFS)
    assert not v.passed and "trained answers on 0%" in v.detail


def test_adapter_effect_needs_input():
    assert not adapter_effect([], {"mlx_adapter": []}, []).passed


# ---------------------------------------------------------------- clean endings


def test_clean_endings_passes_on_answers_that_stop():
    assert clean_endings(
        {"mlx_fused": ans(TRAINED), "ollama": ans(TRAINED, tokens=False)}, max_tokens=24
    ).passed


@pytest.mark.parametrize(
    "answer, why",
    [
        (Answer("Velmora. The capital of", "length"), "finish_reason 'length'"),
        (Answer("Velmora.<|im_end|>\n<|im_start|>user", "stop"), "<|im_end|>"),
        (Answer("Velmora.</s>", "stop"), "</s>"),
        (Answer("Velmora. STOPWORD", "stop"), "STOPWORD"),
    ],
)
def test_clean_endings_fails_on_runaway_or_leaked_special_tokens(answer, why):
    v = clean_endings({"llamacpp": [*ans(TRAINED), answer]}, max_tokens=24, markers=["STOPWORD"])
    assert not v.passed and why in v.detail and "llamacpp #4" in v.detail
    assert v.measured == pytest.approx(4 / 5)


def test_clean_endings_fails_with_nothing_to_judge():
    assert not clean_endings({}, max_tokens=24).passed


# ---------------------------------------------------------------- tokenizer and logprob wrappers


def test_tokenizer_gate():
    texts, ids = ["a b", "c"], [[1, 2], [3]]
    assert tokenizer_gate(texts, ids, [[1, 2], [3]]).passed
    v = tokenizer_gate(texts, ids, [[1, 2], [4]])
    assert not v.passed and v.measured == 0.5
    v = tokenizer_gate(texts, ids, RuntimeError("llama.cpp aborted"))
    assert not v.passed and "aborted" in v.detail


def test_logprob_gate():
    ok = ParityResult(True, [], {"max_abs_diff": 0.04, "top1_agreement_tol": 1.0, "positions": 40.0})
    v = logprob_gate(ok, gguf_type="f16", max_abs=0.1)
    assert v.passed and v.measured == 0.04 and "f16" in v.detail
    bad = ParityResult(False, ["max |logprob diff| 3 > 0.1"], {"max_abs_diff": 3.0, "positions": 40.0})
    assert not logprob_gate(bad, gguf_type="f16", max_abs=0.1).passed
    assert not logprob_gate(RuntimeError("timed out"), gguf_type="f16", max_abs=0.1).passed
