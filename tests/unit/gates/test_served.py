"""Gates on what Ollama serves: its answers, its TEMPLATE and stop strings, its API behaviour."""

from __future__ import annotations

from finetune.gates.parity import Answer
from finetune.gates.served import served_answers, served_api, served_defaults, served_template
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


def test_where_mlx_ran_to_its_budget_ollama_running_on_with_the_same_text_agrees():
    """Ollama's default requests use the Modelfile's num_predict, which may exceed the evaluation's budget."""
    cut = [Answer("def f(x):\n    return", "length", [1, 2]), *MLX[1:]]
    longer = served(["def f(x):\n    return x + 1", *[f"{r}." for r in REFS[1:]]])
    assert served_answers(longer, cut, REFS, threshold=1.0).passed
    stopped = [
        Answer("def f(x):\n    return", "stop", [1, 2]),
        *MLX[1:],
    ]  # it ended there: running on differs
    assert served_answers(longer, stopped, REFS, threshold=1.0).measured == 0.75


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
IDS = [[1, 9, 8, 2], [1, 9, 7, 7, 2], [1, 5, 2]]
PROMPTS = {
    "training_ids": IDS,
    "served_ids": [*IDS[:2], None],
    "served_counts": [4, 5, None],
    "tokenizer": "t",
}


def test_served_template_passes_when_ollama_renders_training_s_token_ids_with_its_stops():
    v = served_template(FMT.template, list(FMT.stop), FMT.template, FMT.stop, PROMPTS)
    assert v.passed and v.measured == 1.0 and "2/2 rendered prompts have training's token ids (t)" in v.detail
    assert v.data == {"stops": FMT.stop, "prompts_compared": 2}


def test_served_template_fails_when_the_template_differs():
    other = chat_format("llama3").template
    v = served_template(other, FMT.stop, FMT.template, FMT.stop, PROMPTS)
    assert not v.passed and v.measured == 0.0 and "served TEMPLATE differs" in v.detail


def test_served_template_fails_when_stop_strings_are_missing():
    v = served_template(FMT.template, [], FMT.template, FMT.stop, PROMPTS)
    assert not v.passed and "lack ['<|im_end|>', '<|im_start|>']" in v.detail
    v = served_template(FMT.template, FMT.stop[:1], FMT.template, FMT.stop, PROMPTS)
    assert not v.passed and "lack ['<|im_start|>']" in v.detail


def test_served_template_fails_on_a_stop_string_training_does_not_justify():
    # a newline stop cuts every multi-line answer short, yet nothing else would notice on one-line answers
    v = served_template(FMT.template, [*FMT.stop, "\n"], FMT.template, FMT.stop, PROMPTS)
    assert not v.passed and "served stop strings ['\\n'] are not end markers" in v.detail


def test_served_template_fails_when_a_rendered_prompt_has_other_ids_even_of_the_same_length():
    # a user's template that writes "User" for "user": same token count, other ids
    swapped = {**PROMPTS, "served_ids": [IDS[0], [1, 9, 7, 6, 2], None], "served_counts": [4, 5, None]}
    v = served_template(FMT.template, FMT.stop, FMT.template, FMT.stop, swapped)
    assert not v.passed
    assert (
        "1/2 prompts Ollama rendered differ from training's token ids (first at position 3: [6, 2] vs [7, 2]"
        in v.detail
    )


def test_served_template_fails_when_ollama_counts_another_length_or_rendered_nothing():
    v = served_template(
        FMT.template, FMT.stop, FMT.template, FMT.stop, {**PROMPTS, "served_counts": [4, 6, 3]}
    )
    assert not v.passed and "Ollama counted other prompt lengths than training's: [(6, 5)]" in v.detail
    v = served_template(FMT.template, FMT.stop, FMT.template, FMT.stop, {**PROMPTS, "served_ids": [None] * 3})
    assert not v.passed and "Ollama logged no rendered prompt for the 3 evaluated conversations" in v.detail


# ---------------------------------------------------------------- served defaults

SHOWN = {"temperature": ["0"], "num_thread": ["1"], "num_ctx": ["2048"], "num_predict": ["256"]}
CONFIGURED = {"num_ctx": 2048, "num_predict": 256, "temperature": 0, "num_thread": 1}
API = [Answer("Velmora.", "stop", None, 14, "<|im_start|>user\nq<|im_end|>\n<|im_start|>assistant\n")]
ASKED = {"text": "Velmora.", "finish": "stop", "rendered": API[0].rendered}


def defaults(shown=SHOWN, configured=CONFIGURED, openai=None, **kw):
    openai = openai or {"defaults": [ASKED] * 3, "greedy": ASKED}
    args = (
        dict(trained_context=256, model_context=8192, longest_answer=9, api_answers=API, openai=openai) | kw
    )
    return served_defaults(shown, configured, **args)


def test_served_defaults_pass_when_the_modelfile_serves_what_was_judged():
    v = defaults()
    assert v.passed and "num_ctx 2048, num_predict 256" in v.detail
    assert v.data == {
        "num_ctx": 2048.0,
        "num_predict": 256.0,
        "longest_answer": 9,
        "openai_default_distinct": 1,
    }


def test_served_defaults_fail_on_a_parameter_served_otherwise_or_not_at_all():
    v = defaults({**SHOWN, "temperature": ["0.7"]})
    assert not v.passed and "temperature is 0.7 as served, 0 as configured" in v.detail
    v = defaults({k: x for k, x in SHOWN.items() if k != "temperature"})
    assert not v.passed and "temperature 0 is configured but not served" in v.detail
    assert "no temperature: default requests sample at Ollama's 0.8" in v.detail


def test_served_defaults_fail_when_the_context_or_the_answer_budget_is_too_small():
    assert "num_ctx 128 < the trained context 256" in defaults({**SHOWN, "num_ctx": ["128"]}, {}).detail
    assert (
        "num_ctx 9000 > the model's context length 8192"
        in defaults({**SHOWN, "num_ctx": ["9000"]}, {}).detail
    )
    assert "no num_ctx" in defaults({k: x for k, x in SHOWN.items() if k != "num_ctx"}, {}).detail
    v = defaults({**SHOWN, "num_predict": ["4"]}, {})
    assert (
        not v.passed
        and "num_predict 4 cuts answers shorter than the longest reference (9 tokens)" in v.detail
    )
    unbounded = defaults({**SHOWN, "num_predict": ["-1"]}, {})
    assert unbounded.passed and "num_predict unbounded" in unbounded.detail


def test_served_defaults_judge_the_openai_endpoint_and_state_its_own_default_temperature():
    sampled = [ASKED, {**ASKED, "text": "Velmora"}, {**ASKED, "text": "Vel"}]
    v = defaults(openai={"defaults": sampled, "greedy": ASKED})
    assert v.passed and "/v1 requests without temperature are sampled (3 different answers of 3)" in v.detail
    other = {**ASKED, "rendered": "q\n"}
    v = defaults(openai={"defaults": [other] * 3, "greedy": {**other, "text": "Paris", "finish": None}})
    assert not v.passed and "/v1 rendered ['q\\n'] where /api/chat rendered" in v.detail
    assert (
        "/v1 at temperature 0 answered 'Paris'" in v.detail and "finish_reason None, not 'stop'" in v.detail
    )
    assert (
        "the OpenAI-compatible endpoint was not asked"
        in served_defaults(
            SHOWN,
            CONFIGURED,
            trained_context=256,
            model_context=None,
            longest_answer=9,
            api_answers=API,
            openai=None,
        ).detail
    )


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
