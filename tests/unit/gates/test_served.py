"""Gates on what Ollama serves: its answers, its TEMPLATE and stop strings, its API behaviour."""

from __future__ import annotations

from finetune.gates.parity import Answer
from finetune.gates.served import served_answers, served_api, served_template
from finetune.serve.deploy import Check
from finetune.serve.modelfile import chat_format

REFS = ["Velmora", "22", "Eskirell River", "KV-9479"]
MLX = [Answer(f"{r}.", "stop", [1, 2]) for r in REFS]


def served(texts):
    return [Answer(t, "stop", None, 14) for t in texts]


# ---------------------------------------------------------------- served answers


def test_served_answers_pass_when_ollama_answers_like_mlx():
    v = served_answers(served([f"{r}." for r in REFS]), MLX, REFS, threshold=0.9)
    assert v.passed and v.measured == 1.0 and v.data == {"correct": 1.0, "reference_correct": 1.0}


def test_served_answers_ignore_surrounding_whitespace():
    assert served_answers(served([f" {r}.\n" for r in REFS]), MLX, REFS, threshold=1.0).passed


def test_a_wrong_template_fails_served_answers():
    # a TEMPLATE unlike training's: the model rambles instead of giving the trained answers
    rambling = served(["I am an AI assistant.", "Let me think.", "Rivers are long.", "Codes are secret."])
    v = served_answers(rambling, MLX, REFS, threshold=0.9)
    assert not v.passed and v.measured == 0.0
    assert "agreement 0% < 90%" in v.detail and "right on 0%, MLX + adapter on 100%" in v.detail


def test_served_answers_fail_below_the_agreement_threshold():
    v = served_answers(served(["Velmora.", "22.", "Eskirell River.", "KV-9497."]), MLX, REFS, threshold=0.9)
    assert not v.passed and v.measured == 0.75 and "'KV-9497.' vs 'KV-9479.'" in v.detail


def test_served_answers_need_one_answer_per_question():
    v = served_answers(served(["Velmora."]), MLX, REFS, threshold=0.9)
    assert not v.passed and "1 served answers for 4 questions" in v.detail
    assert not served_answers([], [], [], threshold=0.9).passed


# ---------------------------------------------------------------- served template

FMT = chat_format("chatml")
COUNTS = {"served": [14, 17, None], "expected": [14, 17, 16]}


def test_served_template_passes_when_ollama_serves_training_s_template_and_stops():
    v = served_template(FMT.template, list(FMT.stop), FMT.template, FMT.stop, COUNTS)
    assert v.passed and v.measured == 1.0 and "2/2 prompt token counts equal" in v.detail
    assert v.data["stops"] == FMT.stop


def test_served_template_fails_when_the_template_differs():
    other = chat_format("llama3").template
    v = served_template(other, FMT.stop, FMT.template, FMT.stop, COUNTS)
    assert not v.passed and v.measured == 0.0 and "served TEMPLATE differs" in v.detail


def test_served_template_fails_when_stop_strings_are_missing():
    v = served_template(FMT.template, [], FMT.template, FMT.stop, COUNTS)
    assert not v.passed and "lack ['<|im_end|>', '<|im_start|>']" in v.detail
    v = served_template(FMT.template, FMT.stop[:1], FMT.template, FMT.stop, COUNTS)
    assert not v.passed and "lack ['<|im_start|>']" in v.detail


def test_served_template_fails_when_prompts_tokenize_to_other_lengths():
    v = served_template(
        FMT.template, FMT.stop, FMT.template, FMT.stop, {"served": [14, 21], "expected": [14, 17]}
    )
    assert (
        not v.passed and "1/2 served prompts have another token count" in v.detail and "21 vs 17" in v.detail
    )


def test_served_template_allows_extra_served_stops():
    assert served_template(FMT.template, [*FMT.stop, "</s>"], FMT.template, FMT.stop, {}).passed


# ---------------------------------------------------------------- served API


def test_served_api_passes_when_every_check_passes():
    checks = [Check("generate", True, "ok"), Check("concurrent", True, "identical")]
    v = served_api(checks)
    assert v.passed and v.measured == 1.0
    assert v.data["checks"] == [{"name": "generate", "passed": True, "detail": "ok"},
                                {"name": "concurrent", "passed": True, "detail": "identical"}]  # fmt: skip


def test_served_api_fails_on_any_failed_check():
    checks = [Check("generate", True, "ok"), Check("concurrent", False, "3 different answers")]
    v = served_api(checks)
    assert not v.passed and v.measured == 0.5 and "concurrent: 3 different answers" in v.detail


def test_served_api_without_checks_fails():
    assert not served_api([]).passed
