"""Tier 3 gates over runtimes: each fails on a broken input (lost adapter, drifting runtime, runaway answer)
and passes on a healthy one; judge_runtimes turns one evaluation's measurements into all of them."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from finetune.config.schema import GatesConfig
from finetune.evaluate.prompts import EvalPrompt
from finetune.gates.parity import Answer, ParityResult, content_tokens
from finetune.gates.runtime_parity import (
    RuntimeMeasurements,
    adapter_effect,
    clean_endings,
    judge_runtimes,
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
    assert v.measured == 1.0 and v.threshold == 0.9


def test_output_parity_fails_when_a_runtime_drifts_past_the_threshold():
    drifted = [*TRAINED[:2], "Velmora River.", "KV-9497."]
    answers = {"mlx_adapter": ans(TRAINED), "mlx_fused": ans(TRAINED), "llamacpp": ans(drifted)}
    v = output_parity(answers, reference="mlx_adapter", thresholds={"mlx_fused": 0.9, "llamacpp": 0.9})
    assert not v.passed
    assert v.measured == 0.5 and "llamacpp: agreement 50%" in v.detail and "prompt 2" in v.detail


def test_output_parity_threshold_zero_reports_without_requiring():
    answers = {"mlx_adapter": ans(TRAINED), "llamacpp": ans(BASE)}
    v = output_parity(answers, reference="mlx_adapter", thresholds={"llamacpp": 0.0})
    assert v.passed and v.measured == 0.0


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


def test_output_parity_with_nothing_compared_is_not_a_pass():
    v = output_parity({"mlx_adapter": ans(TRAINED)}, reference="mlx_adapter", thresholds={})
    assert not v.passed and "no runtimes compared" in v.detail


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


def test_adapter_effect_fails_when_the_base_already_knew_as_much():
    # right answers the base gave too: the fine-tuned runtime must beat the base, not tie it
    v = adapter_effect(ans(TRAINED), {"mlx_adapter": ans([f"It is {r}" for r in REFS])}, REFS)
    assert not v.passed and "> base 100%" in v.detail


def test_adapter_effect_needs_input():
    assert not adapter_effect([], {"mlx_adapter": []}, []).passed
    v = adapter_effect(ans(BASE), {"mlx_adapter": ans(TRAINED[:3])}, REFS)
    assert not v.passed and "3 answers for 4 questions" in v.detail


# ---------------------------------------------------------------- clean endings


def test_clean_endings_passes_on_answers_that_stop():
    v = clean_endings({"mlx_fused": ans(TRAINED), "ollama": ans(TRAINED, tokens=False)})
    assert v.passed and v.measured == 1.0


@pytest.mark.parametrize(
    ("answer", "why"),
    [
        (Answer("Velmora. The capital of", "length"), "finish_reason 'length'"),
        (Answer("Velmora.<|im_end|>\n<|im_start|>user", "stop"), "<|im_end|>"),
        (Answer("Velmora.</s>", "stop"), "</s>"),
        (Answer("Velmora.<|eot_id|>", "stop"), "<|eot_id|>"),
        (Answer("Velmora. STOPWORD", "stop"), "STOPWORD"),
        (Answer("Velmora.", "unknown:load"), "finish_reason 'unknown:load'"),
    ],
)
def test_clean_endings_fails_on_runaway_or_leaked_special_tokens(answer, why):
    v = clean_endings({"llamacpp": [*ans(TRAINED), answer]}, markers=["STOPWORD"])
    assert not v.passed and why in v.detail and "llamacpp #4" in v.detail
    assert v.measured == pytest.approx(4 / 5)


def test_a_run_on_of_the_reference_itself_is_reported_but_a_runtime_running_on_where_it_stopped_fails():
    """A question the fine-tune never learned to answer runs to the budget in every runtime alike: that is the
    model, not how it ships. A runtime running on where base + adapter stopped is (short num_predict, no stop)."""
    loop = Answer("for i in s for i in s for i in s", "length", [3] * 12)
    ref = [*ans(TRAINED), loop]
    same = {"mlx_adapter": ref, "mlx_fused": ref, "ollama": [*ans(TRAINED, tokens=False), loop]}
    v = clean_endings(same)
    assert v.passed and "mlx_adapter itself ran to the budget on #4" in v.detail
    cut = {"mlx_adapter": ref, "ollama": [Answer("Velm", "length"), *ans(TRAINED[1:]), loop]}
    v = clean_endings(cut)
    assert not v.passed and "ollama #0 'Velm': finish_reason 'length' where mlx_adapter ended" in v.detail
    # parted from the reference at a near-tie, then ran on: a different answer (output_parity), not a cut one
    parted = {"mlx_adapter": ref, "llamacpp": [Answer("Velmorian loop loop loop", "length"), *ref[1:]]}
    assert clean_endings(parted).passed


def test_a_reference_that_never_stops_fails_clean_endings():
    never = [Answer(t + " and so on", "length", [3] * 9) for t in TRAINED]
    v = clean_endings({"mlx_adapter": never, "mlx_fused": never})
    assert not v.passed and "mlx_adapter ended on its end token on 0% of its answers" in v.detail
    assert v.data["reference_share"] == 0.0


def test_output_parity_lets_a_served_model_run_further_where_the_reference_hit_its_budget():
    cut = Answer("for i in s for", "length", [3, 4, 5, 6])
    longer = Answer("for i in s for i in s", "length", [3, 4, 5, 6, 4, 5, 6])
    other = Answer("while True: pass", "length", [9, 9, 9])
    answers = {"mlx_adapter": [*ans(TRAINED), cut], "llamacpp": [*ans(TRAINED), longer]}
    assert output_parity(answers, reference="mlx_adapter", thresholds={"llamacpp": 1.0}).passed
    answers["llamacpp"][-1] = other
    assert not output_parity(answers, reference="mlx_adapter", thresholds={"llamacpp": 1.0}).passed
    # where the reference stopped, running on is a difference
    stopped = {
        "mlx_adapter": ans(TRAINED),
        "llamacpp": [*ans(TRAINED[:3]), Answer(TRAINED[3] + " Also", "length")],
    }
    assert not output_parity(stopped, reference="mlx_adapter", thresholds={"llamacpp": 1.0}).passed


def test_clean_endings_fails_with_nothing_to_judge():
    assert not clean_endings({}).passed


# ---------------------------------------------------------------- tokenizer and logprob wrappers


def test_tokenizer_gate():
    texts, ids = ["a b", "c"], [[1, 2], [3]]
    v = tokenizer_gate(texts, ids, [[1, 2], [3]])
    assert v.passed and v.name == "gguf_tokenizer"
    v = tokenizer_gate(texts, ids, [[1, 2], [4]])
    assert not v.passed and v.measured == 0.5
    v = tokenizer_gate(texts, ids, RuntimeError("llama.cpp aborted"))
    assert not v.passed and "aborted" in v.detail


def test_logprob_gate():
    ok = ParityResult(True, [], {"max_abs_diff": 0.04, "top1_agreement_tol": 1.0, "positions": 40.0})
    v = logprob_gate(ok, gguf_type="f16", max_abs=0.1)
    assert v.passed and v.measured == 0.04 and "f16" in v.detail and "40 positions" in v.detail
    bad = ParityResult(False, ["max |logprob diff| 3 > 0.1"], {"max_abs_diff": 3.0, "positions": 40.0})
    v = logprob_gate(bad, gguf_type="f16", max_abs=0.1)
    assert not v.passed and "max |logprob diff| 3 > 0.1" in v.detail
    v = logprob_gate(RuntimeError("timed out"), gguf_type="f16", max_abs=0.1)
    assert not v.passed and "timed out" in v.detail


# ---------------------------------------------------------------- judge_runtimes


def _prompts():
    train = [EvalPrompt("train", f"q{i}", f"p{i}", r) for i, r in enumerate(REFS)]
    return [*train, EvalPrompt("heldout", "hq", "hp", "Velmora")]


def _vocab_rows(n: int, vocab: int = 12) -> np.ndarray:
    rows = np.full((n, vocab), -12.0)
    rows[:, 5] = -0.01
    return rows


def healthy() -> RuntimeMeasurements:
    prompts = _prompts()
    tuned = ans([*TRAINED, "Velmora."])
    answers = {"mlx_base": ans([*BASE, "Paris."]), "mlx_adapter": tuned, "mlx_fused": tuned, "llamacpp": tuned,
               "ollama": ans([*TRAINED, "Velmora."], tokens=False)}  # fmt: skip
    runtimes = {k: {"status": "passed", "reason": None} for k in answers}
    return RuntimeMeasurements(
        prompts=prompts, gguf_type="f16", stops=["<|im_end|>"], end_ids=[EOS], answers=answers,
        runtimes=runtimes, tokenizer_texts=["a", "b"], hf_ids=[[1], [2]], gguf_ids=[[1], [2]],
        logprob_reference=_vocab_rows(3), logprob_candidate=[{5: -0.02, 7: -12.0}] * 3,
    )  # fmt: skip


def _by_name(verdicts):
    return {v.name: v for v in verdicts}


def test_judge_runtimes_passes_a_healthy_evaluation():
    verdicts = judge_runtimes(healthy(), GatesConfig())
    assert [v.name for v in verdicts] == [
        "output_parity",
        "adapter_effect",
        "clean_endings",
        "gguf_tokenizer",
        "logprob_parity",
    ]
    assert all(v.passed for v in verdicts), [str(v) for v in verdicts]
    assert set(_by_name(verdicts)["output_parity"].data["rates"]) == {"mlx_fused", "llamacpp", "ollama"}


def test_judge_runtimes_judges_adapter_effect_on_training_questions_only():
    m = healthy()
    m.answers["mlx_adapter"][-1] = m.answers["mlx_fused"][-1] = Answer("Paris.", "stop", [6, EOS])
    m.answers["llamacpp"] = m.answers["mlx_adapter"]
    m.answers["ollama"] = [*m.answers["ollama"][:-1], Answer("Paris.", "stop")]
    v = _by_name(judge_runtimes(m, GatesConfig()))["adapter_effect"]
    assert v.passed and v.measured == 1.0  # the held-out miss does not count


def test_judge_runtimes_fails_output_parity_when_fused_mlx_serves_the_base():
    m = healthy()
    m.answers["mlx_fused"] = m.answers["mlx_base"]
    v = _by_name(judge_runtimes(m, GatesConfig()))
    assert not v["output_parity"].passed and "mlx_fused" in v["output_parity"].detail
    assert not v["adapter_effect"].passed and "mlx_fused" in v["adapter_effect"].detail


def test_judge_runtimes_uses_the_looser_threshold_for_a_quantized_gguf():
    m = healthy()
    m.answers["llamacpp"] = ans([*TRAINED[:3], "KV-9497.", "Velmora."])  # 4/5 agree: 80%
    assert not _by_name(judge_runtimes(m, GatesConfig()))["output_parity"].passed
    quantized = judge_runtimes(replace(m, gguf_type="q8_0"), GatesConfig())
    assert _by_name(quantized)["output_parity"].passed
    assert _by_name(quantized)["output_parity"].threshold == GatesConfig().quantized_text_agreement


def test_judge_runtimes_uses_the_tolerance_of_the_gguf_type():
    m = healthy()
    m.logprob_candidate = [{5: -0.01 - 0.5, 7: -12.0}] * 3  # 0.5 off: too much for f16, fine for q8_0
    assert not _by_name(judge_runtimes(m, GatesConfig()))["logprob_parity"].passed
    v = _by_name(judge_runtimes(replace(m, gguf_type="q8_0"), GatesConfig()))["logprob_parity"]
    assert v.passed and v.threshold == GatesConfig().logprob_max_abs.q8_0


def test_judge_runtimes_skips_the_llamacpp_gates_with_the_reason():
    m = healthy()
    del m.answers["llamacpp"]
    m.runtimes["llamacpp"] = {"status": "skipped", "reason": "xllamacpp is not installed"}
    m.gguf_ids = m.logprob_reference = m.logprob_candidate = None
    v = _by_name(judge_runtimes(m, GatesConfig()))
    assert v["output_parity"].passed and "llamacpp" not in v["output_parity"].data["rates"]
    for name in ("gguf_tokenizer", "logprob_parity"):
        assert v[name].status == "skipped" and "xllamacpp is not installed" in v[name].detail


def test_judge_runtimes_fails_on_a_crashed_runtime_instead_of_skipping_it():
    m = healthy()
    del m.answers["llamacpp"]
    m.runtimes["llamacpp"] = {"status": "failed", "reason": "LlamaCppError: child exited with code -6"}
    v = _by_name(judge_runtimes(m, GatesConfig()))
    assert not v["output_parity"].passed and "code -6" in v["output_parity"].detail
    assert not v["clean_endings"].passed and "llamacpp" in v["clean_endings"].detail


def test_judge_runtimes_fails_the_gguf_gates_on_measurement_errors():
    m = healthy()
    m.gguf_ids, m.gguf_ids_error = None, "LlamaCppError: std::out_of_range"
    m.logprob_candidate, m.logprob_error = None, "LlamaCppError: timed out after 300 s"
    v = _by_name(judge_runtimes(m, GatesConfig()))
    assert not v["gguf_tokenizer"].passed and "out_of_range" in v["gguf_tokenizer"].detail
    assert not v["logprob_parity"].passed and "timed out" in v["logprob_parity"].detail


def test_judge_runtimes_without_base_answers_fails_adapter_effect():
    m = healthy()
    del m.answers["mlx_base"]
    m.runtimes["mlx_base"] = {"status": "failed", "reason": "OSError: no weights"}
    v = _by_name(judge_runtimes(m, GatesConfig()))["adapter_effect"]
    assert not v.passed and "no base answers: OSError: no weights" in v.detail


def test_judge_runtimes_without_ollama_compares_the_rest():
    m = healthy()
    del m.answers["ollama"]
    m.runtimes["ollama"] = {"status": "skipped", "reason": "no Ollama binary"}
    v = _by_name(judge_runtimes(m, GatesConfig()))
    assert all(x.passed for x in v.values()) and "ollama" not in v["output_parity"].data["rates"]
