"""The quantized-export gates on measurements written out here: each bar fails on its own."""

from __future__ import annotations

from dataclasses import replace

import pytest

from finetune.evaluate.quant_measure import QuantMeasurement
from finetune.gates.quant_quality import limits_from, quant_answers, quant_quality, quant_types
from finetune.gates.registry import DEFAULT

# SmolLM2 q4_K_M vs its f16, measured here (see the README's quality table)
HEALTHY = QuantMeasurement(0.0566, 0.296, 0.868, 1.047, 438, 438, 20.75, 21.72)
LIMITS = limits_from(None)


def test_a_healthy_q4_k_m_passes():
    v = quant_quality(HEALTHY, "q4_K_M", LIMITS)
    assert v.passed and "KL mean 0.0566" in v.detail and v.measured == HEALTHY.kl_mean


@pytest.mark.parametrize(
    "change, named",
    [
        ({"kl_mean": 0.27}, "mean KL"),
        ({"kl_p99": 1.2}, "p99 KL"),
        ({"top1": 0.66}, "top-1 agreement"),
        ({"ppl_ratio": 1.33}, "perplexity x1.330"),
        ({"ppl_ratio": float("nan")}, "perplexity"),
    ],
)
def test_each_bar_fails_on_its_own(change, named):
    v = quant_quality(replace(HEALTHY, **change), "q2_K", LIMITS)
    assert not v.passed and named in v.detail.split(": ", 1)[1]


def test_limits_come_from_the_config_and_default_to_the_registry():
    class Gates:
        quant_kl_mean_max = 0.01

    assert limits_from(Gates())["quant_kl_mean_max"] == 0.01
    assert limits_from(None)["quant_top1_min"] == DEFAULT["quant_top1_min"]


def test_quant_types_passes_only_without_problems():
    assert quant_types([], "q8_0", 29).passed
    v = quant_types(["general.file_type is 2, not 7 (q8_0)"], "q8_0", 29)
    assert not v.passed and "file_type is 2" in v.detail


# SmolLM2's measured shares (README): f16 7/8 train; q8_0 6/8 in llama.cpp; q2_K 1/8.
F16 = {"train": 0.875, "heldout": 0.5}


def _scores(llama, ollama):
    return {"f16": F16, "q4_K_M": llama, "ollama q4_K_M": ollama}


def test_quant_answers_passes_a_quantization_that_keeps_what_was_taught():
    v = quant_answers(_scores({"train": 0.75, "heldout": 0.5}, F16), "q4_K_M", 0.75)
    assert (
        v.passed
        and v.measured == pytest.approx(1.25 / 1.375)
        and "91% in llama.cpp, 100% in Ollama" in v.detail
    )


def test_quant_answers_fails_on_the_worst_runtime():
    v = quant_answers(_scores(F16, {"train": 0.125, "heldout": 0.0}), "q4_K_M", 0.75)
    assert (
        v.status == "failed"
        and v.measured == pytest.approx(0.125 / 1.375)
        and v.data["kept"]["llama.cpp"] == 1
    )


def test_quant_answers_without_questions_or_anything_learned_is_a_skip_not_a_pass():
    assert quant_answers({"skipped": "raw-text rows"}, "q8_0", 0.75).status == "skipped"
    none_right = quant_answers(
        {"f16": {"train": 0.0, "heldout": None}, "q8_0": F16, "ollama q8_0": F16}, "q8_0", 0.75
    )
    assert none_right.status == "skipped" and "nothing to keep" in none_right.detail


def test_quant_answers_not_asked_in_ollama_fails():
    v = quant_answers({"f16": F16, "q4_K_M": F16}, "q4_K_M", 0.75)
    assert v.status == "failed" and "not asked in Ollama" in v.detail
