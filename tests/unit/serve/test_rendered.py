"""The prompts Ollama rendered, read back from its debug log; on a real server, a user's deploy.template judged by
the token ids of what Ollama renders (the TEMPLATE text itself is the user's, so only the render can tell)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

from finetune.serve.rendered import asked_and_rendered, go_unquote, log_size, rendered_prompts, rendered_since
from tests.conftest import RealOllama


@pytest.mark.parametrize(
    ("quoted", "text"),
    [
        ('"a\\nb\\t\\"c\\"\\\\"', 'a\nb\t"c"\\'),
        ('"non\\u00a0breaking é 日本 \\U0001f999"', "non\u00a0breaking é 日本 \U0001f999"),
        ('"bell\\a\\x01 \\r\\v\\f"', "bell\a\x01 \r\v\f"),
        ("bare", "bare"),
    ],
)
def test_go_quoted_text_reads_back_exactly(quoted, text):
    assert go_unquote(quoted) == text


def test_an_unknown_escape_is_an_error_not_a_guess():
    with pytest.raises(ValueError, match=r"unknown escape \\q"):
        go_unquote('"\\q"')


def test_rendered_prompts_are_read_from_chat_and_generate_lines_in_order(tmp_path):
    log = tmp_path / "ollama-serve.log"
    log.write_text(
        'time=1 level=DEBUG source=routes.go:1542 msg="chat request" images=0 prompt="<|im_start|>user\\nHi"\n'
        'time=2 level=DEBUG source=cache.go:104 msg="loading cache slot" id=0 cache=0 prompt=26\n'
    )
    mark = log_size(log)
    with open(log, "a") as f:
        f.write('time=3 level=DEBUG source=routes.go:1 msg="generate request" images=0 prompt=plain\n')
    assert rendered_prompts(log.read_text()) == ["<|im_start|>user\nHi", "plain"]
    assert rendered_since(log, mark) == ["plain"]
    assert log_size(tmp_path / "none.log") == 0


def test_a_request_comes_back_with_the_last_prompt_rendered_while_it_ran(tmp_path):
    log = tmp_path / "ollama-serve.log"
    log.write_text('time=1 level=DEBUG msg="chat request" images=0 prompt="before"\n')

    def ask():
        with open(log, "a") as f:
            f.write('time=2 level=DEBUG msg="chat request" images=0 prompt="a\\nb"\n')
        return "answer"

    assert asked_and_rendered(log, ask) == ("answer", "a\nb")
    assert asked_and_rendered(log, lambda: "quiet") == ("quiet", None)  # nothing logged meanwhile
    assert asked_and_rendered(None, lambda: "no log") == ("no log", None)


# ---------------------------------------------------------------- real server

CONVERSATION = (
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Name a colour, please."},
)
# ChatML as a user might write it for deploy.template; the second writes "User" where training has "user":
# the same number of tokens for SmolLM2, other ids
USER_CHATML = "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}<|im_start|>assistant\n"
USER_CAPITALISED = USER_CHATML.replace(
    "<|im_start|>{{ .Role }}", '<|im_start|>{{ if eq .Role "user" }}User{{ else }}{{ .Role }}{{ end }}'
)


@pytest.mark.skipif(
    importlib.util.find_spec("xllamacpp") is None, reason="xllamacpp (llama.cpp) is not installed"
)
def test_a_user_template_is_judged_by_the_ids_ollama_renders(
    real_ollama: RealOllama, smollm2_tokenizer, tmp_path: Path
):
    from finetune.data.templates import get_template
    from finetune.evaluate.decode import prompt_ids
    from finetune.evaluate.prompts import EvalPrompt
    from finetune.evaluate.runtimes import ollama_answers
    from finetune.gates.served import served_template
    from finetune.serve.llamacpp import tokenize
    from finetune.serve.modelfile import render_modelfile
    from finetune.serve.ollama_server import OllamaServer
    from finetune.serve.rendered import DEBUG_ENV

    stops = ["<|im_end|>", "<|im_start|>"]
    training = get_template("chatml").render_prompt(list(CONVERSATION))
    prompt = EvalPrompt("train", CONVERSATION[-1]["content"], training, "red", messages=CONVERSATION)
    verdicts = {}
    with OllamaServer(real_ollama.binary, tmp_path, env_extra=DEBUG_ENV) as server:
        for name, template in (("good", USER_CHATML), ("capitalised", USER_CAPITALISED)):
            path = tmp_path / f"Modelfile.{name}"
            params = {"num_predict": 4, "temperature": 0}
            path.write_text(
                render_modelfile(real_ollama.gguf, template=template, stop=stops, parameters=params)
            )
            server.create_model(name, path)
            (answer,) = ollama_answers(server, name, [prompt])
            served_ids = tokenize(real_ollama.gguf, [answer.rendered])
            ids = {"training_ids": [prompt_ids(smollm2_tokenizer, training)], "served_ids": served_ids,
                   "served_counts": [answer.prompt_tokens], "tokenizer": "gguf"}  # fmt: skip
            verdicts[name] = served_template(template, stops, template, stops, ids)
    assert verdicts["good"].passed, verdicts["good"].detail
    bad = verdicts["capitalised"]
    assert not bad.passed and "1/1 prompts Ollama rendered differ from training's token ids" in bad.detail
    assert "other prompt lengths" not in bad.detail  # the count alone (the old check) could not see it
