"""finetune.data.templates: exact text, trained spans and prompts of every chat template."""

import pytest

from finetune.data.templates import (
    ALPACA_PREAMBLE,
    TEMPLATE_NAMES,
    Template,
    TemplateError,
    get_template,
    validate_messages,
)
from finetune.errors import UserError

MULTI = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "2+2?"},
    {"role": "assistant", "content": "4."},
]
SINGLE = [{"role": "user", "content": "Capital of Zorbania?"}, {"role": "assistant", "content": "Velmora."}]

EXPECTED = {
    ("chatml", "multi"): (
        "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
        "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\n2+2?<|im_end|>\n"
        "<|im_start|>assistant\n4.<|im_end|>\n",
        ["Hello.<|im_end|>", "4.<|im_end|>"],
    ),
    ("chatml", "single"): (
        "<|im_start|>user\nCapital of Zorbania?<|im_end|>\n<|im_start|>assistant\nVelmora.<|im_end|>\n",
        ["Velmora.<|im_end|>"],
    ),
    ("llama3", "multi"): (
        "<|begin_of_text|><|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
        "<|start_header_id|>user<|end_header_id|>\n\n2+2?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n4.<|eot_id|>",
        ["Hello.<|eot_id|>", "4.<|eot_id|>"],
    ),
    ("llama3", "single"): (
        "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nCapital of Zorbania?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nVelmora.<|eot_id|>",
        ["Velmora.<|eot_id|>"],
    ),
    ("llama2", "multi"): (
        "<s>[INST] <<SYS>>\nBe brief.\n<</SYS>>\n\nHi [/INST] Hello. </s><s>[INST] 2+2? [/INST] 4. </s>",
        [" Hello. </s>", " 4. </s>"],
    ),
    ("llama2", "single"): (
        "<s>[INST] Capital of Zorbania? [/INST] Velmora. </s>",
        [" Velmora. </s>"],
    ),
    ("alpaca", "multi"): (
        "Be brief.\n\n### Instruction:\nHi\n\n### Response:\nHello.</s>"
        "\n\n### Instruction:\n2+2?\n\n### Response:\n4.</s>",
        ["Hello.</s>", "4.</s>"],
    ),
    ("alpaca", "single"): (
        "Below is an instruction that describes a task. Write a response that appropriately completes the "
        "request.\n\n### Instruction:\nCapital of Zorbania?\n\n### Response:\nVelmora.</s>",
        ["Velmora.</s>"],
    ),
}
CONVERSATIONS = {"multi": MULTI, "single": SINGLE}


@pytest.mark.parametrize(("name", "conv"), sorted(EXPECTED))
def test_builtin_templates_render_exact_text_and_spans(name, conv):
    messages = CONVERSATIONS[conv]
    text, answers = EXPECTED[(name, conv)]
    rendered = get_template(name).render(messages)
    assert rendered.text == text
    assert [rendered.text[s:e] for s, e in rendered.train_spans] == answers


@pytest.mark.parametrize(("name", "conv"), sorted(EXPECTED))
def test_prompt_is_text_before_last_answer_and_matches_render_prompt(name, conv):
    messages = CONVERSATIONS[conv]
    template = get_template(name)
    rendered = template.render(messages)
    last_start = rendered.train_spans[-1][0]
    assert rendered.prompt == rendered.text[:last_start]
    assert template.render_prompt(messages[:-1]) == rendered.prompt


def test_spans_are_ordered_and_disjoint():
    for name in ("alpaca", "chatml", "llama2", "llama3"):
        spans = get_template(name).render(MULTI).train_spans
        assert all(s < e for s, e in spans)
        assert all(a[1] <= b[0] for a, b in zip(spans, spans[1:], strict=False))


def test_stop_strings():
    assert get_template("chatml").stop_strings == ["<|im_end|>"]
    assert get_template("llama3").stop_strings == ["<|eot_id|>"]
    assert get_template("llama2").stop_strings == ["</s>"]
    assert get_template("alpaca").stop_strings == ["</s>", "### Instruction:"]


def test_alpaca_and_llama2_use_the_tokenizers_eos():
    class Tok:
        eos_token = "<|endoftext|>"

    assert get_template("alpaca", Tok()).render(SINGLE).text.endswith("Velmora.<|endoftext|>")
    assert get_template("llama2", Tok()).stop_strings == ["<|endoftext|>"]


def test_unknown_template_lists_valid_names():
    with pytest.raises(ValueError, match="unknown template 'vicuna'") as err:
        get_template("vicuna")
    for name in TEMPLATE_NAMES:
        assert name in str(err.value)


def test_tokenizer_template_without_tokenizer_is_a_clear_error():
    with pytest.raises(TemplateError, match="needs a tokenizer"):
        get_template("tokenizer")


@pytest.mark.parametrize(
    ("messages", "match"),
    [
        ([], "non-empty"),
        ([{"role": "user", "content": "q"}], "must end with an assistant"),
        (
            [{"role": "user", "content": "q"}, {"role": "user", "content": "q"}],
            r"messages\[1\]: expected role",
        ),
        ([{"role": "bot", "content": "q"}], r"messages\[0\].role is 'bot'"),
        ([{"role": "user", "content": 3}], r"content must be a string, got int"),
        (
            [
                {"role": "user", "content": "q"},
                {"role": "system", "content": "s"},
                {"role": "assistant", "content": "a"},
            ],
            "system message is only allowed first",
        ),
        ([{"role": "assistant", "content": "a"}], "expected role 'user'"),
    ],
)
def test_invalid_conversations_are_rejected(messages, match):
    with pytest.raises(TemplateError, match=match):
        validate_messages(messages)
    with pytest.raises(TemplateError):
        get_template("chatml").render(messages)


def test_valid_conversation_passes_validation():
    validate_messages(MULTI)
    validate_messages(MULTI[:-1], final_role="user")


def test_render_prompt_requires_a_final_user_turn():
    with pytest.raises(TemplateError, match="must end with an user"):
        get_template("chatml").render_prompt(SINGLE)


class FakeChatTokenizer:
    """A tokenizer whose chat template is plain Python; `stable=False` drops history like some templates do."""

    eos_token = "<eos>"
    chat_template = "fake"

    def __init__(self, stable=True):
        self.stable = stable

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        shown = messages if self.stable or len(messages) < 3 else messages[-2:]
        text = "".join(f"[{m['role']}]{m['content']}<end>\n" for m in shown)
        return text + ("[assistant]" if add_generation_prompt else "")


def test_tokenizer_template_finds_spans_by_prefix_rendering():
    template = get_template("tokenizer", FakeChatTokenizer())
    rendered = template.render(MULTI)
    assert (
        rendered.text
        == "[system]Be brief.<end>\n[user]Hi<end>\n[assistant]Hello.<end>\n[user]2+2?<end>\n[assistant]4.<end>\n"
    )
    assert [rendered.text[s:e] for s, e in rendered.train_spans] == ["Hello.<end>", "4.<end>"]
    assert rendered.prompt == template.render_prompt(MULTI[:-1])
    assert template.stop_strings == ["<end>", "<eos>"]


def test_tokenizer_template_that_is_not_prefix_stable_is_rejected():
    template = get_template("tokenizer", FakeChatTokenizer(stable=False))
    with pytest.raises(TemplateError, match="not prefix-stable"):
        template.render(MULTI)


def test_tokenizer_without_chat_template_is_rejected():
    tok = FakeChatTokenizer()
    tok.chat_template = None
    with pytest.raises(TemplateError, match="no chat_template"):
        get_template("tokenizer", tok)


SMOL_SYSTEM = (
    "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
)


def test_tokenizer_template_with_smollm2_matches_its_chat_template(smollm2_tokenizer):
    template = get_template("tokenizer", smollm2_tokenizer)
    assert template.stop_strings == ["<|im_end|>"]

    rendered = template.render(SINGLE)
    chatml = get_template("chatml").render(SINGLE)
    assert rendered.text == SMOL_SYSTEM + chatml.text  # SmolLM2 adds a default system prompt
    assert [rendered.text[s:e] for s, e in rendered.train_spans] == ["Velmora.<|im_end|>"]
    assert rendered.prompt == SMOL_SYSTEM + chatml.prompt
    assert rendered.text == smollm2_tokenizer.apply_chat_template(SINGLE, tokenize=False)

    multi = template.render(MULTI)
    assert multi == get_template("chatml").render(MULTI)  # with a system message it is plain ChatML
    expected_prompt = smollm2_tokenizer.apply_chat_template(
        MULTI[:-1], tokenize=False, add_generation_prompt=True
    )
    assert template.render_prompt(MULTI[:-1]) == expected_prompt == multi.prompt


def test_alpaca_preamble_is_the_default_system_text():
    assert get_template("alpaca").render(SINGLE).text.startswith(ALPACA_PREAMBLE + "\n\n### Instruction:")


def test_template_error_is_a_user_error():
    with pytest.raises(UserError):
        validate_messages([])


def test_a_failing_tokenizer_template_keeps_its_message():
    class Broken(FakeChatTokenizer):
        def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
            raise RuntimeError("jinja2: 'messages' is undefined")

    with pytest.raises(
        TemplateError, match="the tokenizer's chat template failed: jinja2: 'messages' is undefined"
    ):
        get_template("tokenizer", Broken())


def test_template_is_a_plain_dataclass():
    assert isinstance(get_template("chatml"), Template)
    assert get_template("chatml").name == "chatml"


def test_gemma_renders_googles_format_without_bos_and_trains_answer_plus_end_of_turn():
    from finetune.data.templates import get_template

    convo = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Zorbania?"},
             {"role": "assistant", "content": "Velmora."}]  # fmt: skip
    r = get_template("gemma").render(convo)
    assert r.text == ("<start_of_turn>user\nBe brief.\n\nCapital of Zorbania?<end_of_turn>\n"
                      "<start_of_turn>model\nVelmora.<end_of_turn>\n")  # fmt: skip
    assert [r.text[s:e] for s, e in r.train_spans] == ["Velmora.<end_of_turn>"]
    assert get_template("gemma").render_prompt(convo[:2]).endswith("<start_of_turn>model\n")


def test_plain_ends_each_answer_with_the_tokenizers_eos_and_needs_a_tokenizer():
    from types import SimpleNamespace

    from finetune.data.templates import TemplateError, get_template

    t = get_template("plain", tokenizer=SimpleNamespace(eos_token="<|endoftext|>"))
    r = t.render([{"role": "user", "content": "2 + 2?"}, {"role": "assistant", "content": "4"}])
    assert r.text == "2 + 2?\n4<|endoftext|>" and [r.text[s:e] for s, e in r.train_spans] == [
        "4<|endoftext|>"
    ]
    assert t.stop_strings == ["<|endoftext|>"]
    with pytest.raises(TemplateError, match="EOS"):
        get_template("plain")


def test_auto_picks_the_family_of_the_models_own_template(smollm2_tokenizer):
    from finetune.data.templates import auto_template_name
    from finetune.models.gemma import CHAT_TEMPLATE as GEMMA

    # SmolLM2: ChatML without the system prompt its own template injects
    assert auto_template_name(smollm2_tokenizer) == "chatml"
    assert get_template("auto", smollm2_tokenizer).render(SINGLE) == get_template("chatml").render(SINGLE)
    tok = FakeChatTokenizer()
    for source, family in ((GEMMA, "gemma"), ("{{ '<|start_header_id|>' }}", "llama3"), ("[INST]", "llama2"),
                           ("<<{{ m }}>>", "tokenizer"), (None, "plain")):  # fmt: skip
        tok.chat_template = source
        assert auto_template_name(tok) == family, source
    with pytest.raises(TemplateError, match="pass tokenizer="):
        get_template("auto")


def test_control_tokens_the_vocabulary_splits_are_named(toy_tokenizer):
    from finetune.data.templates import check_special_tokens, split_special_tokens

    assert split_special_tokens(get_template("chatml"), toy_tokenizer) == {}
    split = split_special_tokens(get_template("gemma"), toy_tokenizer)
    assert set(split) == {"<start_of_turn>", "<end_of_turn>"} and all(n > 1 for n in split.values())
    check_special_tokens(get_template("chatml"), toy_tokenizer)
    with pytest.raises(TemplateError, match=r"'gemma' writes control tokens .*<start_of_turn> -> \d+ tokens"):
        check_special_tokens(get_template("gemma"), toy_tokenizer)
