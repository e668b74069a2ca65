"""Modelfile rendering, quoting and chat templates; served_chat derives what Ollama must serve from training's
template; the real-server part needs an Ollama binary (the real_ollama fixture)."""

from __future__ import annotations

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from finetune.config.schema import DeployConfig
from finetune.data.templates import ALPACA_PREAMBLE, get_template
from finetune.serve.deploy import _check_from
from finetune.serve.modelfile import (
    DEFAULT_EOS,
    FORMAT_NAMES,
    ModelfileError,
    chat_format,
    chatml_template,
    render_modelfile,
    served_chat,
    stop_for,
    template_for,
)
from finetune.serve.modelfile_syntax import parse_modelfile
from finetune.serve.ollama_server import OllamaServer
from finetune.serve.rendered import DEBUG_ENV, asked_and_rendered
from tests.conftest import RealOllama


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


def test_paths_relative_to_the_modelfile_folder_move_with_the_run(tmp_path: Path) -> None:
    run = tmp_path / "run"
    gguf, adapter, folder = run / "gguf" / "model.gguf", run / "ollama" / "a.gguf", run / "ollama"
    text = render_modelfile(
        gguf, template="x", stop=["s"], parameters={}, adapter=adapter, relative_to=folder
    )
    assert text.splitlines()[:2] == ["FROM ../gguf/model.gguf", "ADAPTER ./a.gguf"]
    assert str(tmp_path) not in text
    moved = (
        tmp_path / "elsewhere"
    )  # deploy's FROM check resolves it from the Modelfile's folder, as Ollama does
    (moved / "gguf").mkdir(parents=True)
    (moved / "gguf" / "model.gguf").write_bytes(b"GGUF")
    check = _check_from(parse_modelfile(text), moved / "gguf" / "model.gguf", moved / "ollama")
    assert check.passed, check.detail


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


def test_chat_formats_and_stops() -> None:
    assert template_for("chatml") == chatml_template()
    assert stop_for("chatml") == ["<|im_end|>", "<|im_start|>"]
    assert stop_for("llama3")[0] == "<|eot_id|>"
    assert stop_for("llama2", eos="<eos>")[0] == "<eos>"
    assert "<eos>" in template_for("alpaca", eos="<eos>") and "@EOS@" not in template_for("alpaca")
    assert ALPACA_PREAMBLE in template_for("alpaca")
    for name in FORMAT_NAMES:
        fmt = chat_format(name)
        # every template renders the messages path (Ollama >= 0.3 uses it for /api/generate too); the older
        # formats also keep the legacy .System/.Prompt path
        assert ".Messages" in fmt.template and fmt.template.count("{{") == fmt.template.count("}}")
        if name not in ("gemma", "plain"):
            assert ".Prompt" in fmt.template and ".System" in fmt.template


def test_unknown_format_is_a_clear_error() -> None:
    with pytest.raises(ModelfileError, match="valid names: chatml, gemma, llama3, llama2, alpaca, plain"):
        chat_format("vicuna")
    with pytest.raises(ModelfileError, match="pass deploy.template explicitly"):
        chat_format("tokenizer")


def test_list_parameters_become_one_line_each(tmp_path: Path) -> None:
    text = render_modelfile(tmp_path / "m.gguf", template="t", stop=["s"], parameters={"seed": [1, 2]})
    assert "PARAMETER seed 1\nPARAMETER seed 2\n" in text


def test_llama2_and_alpaca_use_the_given_end_of_sequence_text() -> None:
    assert DEFAULT_EOS == "</s>"
    assert stop_for("llama2") == ["</s>", "[INST]", "[/INST]"]
    assert stop_for("alpaca", eos="<|endoftext|>") == ["<|endoftext|>", "### Instruction:"]
    assert "@EOS@" not in template_for("llama2") and "@PREAMBLE@" not in template_for("alpaca")


# ---------------------------------------------------------------- served_chat


CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Hi"},
    {"role": "assistant", "content": "Hello."},
    {"role": "user", "content": "Name a colour."},
]


@pytest.mark.parametrize("name", FORMAT_NAMES)
def test_served_chat_of_a_named_format(name, toy_tokenizer) -> None:
    template, stops, system = served_chat(name, DeployConfig(), toy_tokenizer)
    fmt = chat_format(name, eos=toy_tokenizer.eos_token)
    assert (template, stops, system) == (fmt.template, fmt.stop, None)


def test_served_chat_keeps_deploy_overrides() -> None:
    d = DeployConfig(stop=["<|im_end|>"], system="Be brief.")
    assert served_chat("chatml", d, None) == (chatml_template(), ["<|im_end|>"], "Be brief.")
    d = DeployConfig(template="{{ .Prompt }}", stop=["END"])
    assert served_chat("chatml", d, None) == ("{{ .Prompt }}", ["END"], None)


def test_served_chat_needs_stops_with_an_explicit_template() -> None:
    with pytest.raises(ModelfileError, match="give deploy.stop too"):
        served_chat("chatml", DeployConfig(template="{{ .Prompt }}"), None)


def test_served_chat_matches_a_tokenizer_template_that_is_chatml(toy_tokenizer) -> None:
    # the toy tokenizer's own template renders plain ChatML: no system prompt to carry over
    assert served_chat("tokenizer", DeployConfig(), toy_tokenizer) == (
        chatml_template(),
        stop_for("chatml"),
        None,
    )


def test_served_chat_carries_the_system_prompt_a_tokenizer_template_injects(smollm2_tokenizer) -> None:
    template, stops, system = served_chat("tokenizer", DeployConfig(), smollm2_tokenizer)
    assert template == chatml_template() and stops == stop_for("chatml")
    assert system and "SmolLM" in system
    # what Ollama then renders (SYSTEM + the ChatML template) is what training rendered
    ping = [{"role": "user", "content": "ping"}]
    trained = get_template("tokenizer", tokenizer=smollm2_tokenizer).render_prompt(ping)
    served = get_template("chatml").render_prompt([{"role": "system", "content": system}, *ping])
    assert served == trained
    with pytest.raises(ModelfileError, match="differs from the system prompt the data template adds"):
        served_chat("tokenizer", DeployConfig(system="Another prompt."), smollm2_tokenizer)


def test_served_chat_matches_the_gemma_tokenizer_template_without_its_bos() -> None:
    # the packaged gemma3-270m's tokenizer carries Google's template, which renders "<bos>" itself;
    # Ollama adds BOS on its own, so the served template is the Gemma format without it
    from finetune.models.gemma import CHAT_TEMPLATE
    from tests.conftest import build_toy_tokenizer

    gemma = build_toy_tokenizer()
    gemma.chat_template = CHAT_TEMPLATE
    trained = get_template("tokenizer", tokenizer=gemma).render_prompt(CONVERSATION)
    assert trained.startswith(gemma.bos_token + "<start_of_turn>user\nYou are terse.\n\nHi")
    template, stops, system = served_chat("tokenizer", DeployConfig(), gemma)
    assert (template, stops, system) == (template_for("gemma"), stop_for("gemma"), None)
    assert get_template("gemma").render_prompt(CONVERSATION) == trained[len(gemma.bos_token) :]


def test_served_chat_refuses_a_tokenizer_template_it_cannot_reproduce(toy_tokenizer) -> None:
    from tests.conftest import build_toy_tokenizer

    odd = build_toy_tokenizer()
    odd.chat_template = "{% for m in messages %}<<{{ m['role'] }}>> {{ m['content'] }}\n{% endfor %}"
    with pytest.raises(ModelfileError, match="no Ollama template here reproduces"):
        served_chat("tokenizer", DeployConfig(), odd)


# ---------------------------------------------------------------- real server


def test_server_renders_each_format_like_the_training_templates(
    real_ollama: RealOllama, tmp_path: Path
) -> None:
    """With OLLAMA_DEBUG the server logs the prompt it built: it must be the text we train on."""
    with OllamaServer(real_ollama.binary, tmp_path, env_extra=DEBUG_ENV) as server:
        client = server.client(timeout=60)
        for name in FORMAT_NAMES:
            fmt = chat_format(name)
            path = tmp_path / f"Modelfile.{name}"
            path.write_text(
                render_modelfile(
                    real_ollama.gguf, template=fmt.template, stop=fmt.stop, parameters={"num_predict": 1}
                )
            )
            server.create_model(f"fmt-{name}", path)
            shown = server.show(f"fmt-{name}")
            assert shown["template"] == fmt.template
            assert all(json.dumps(s) in shown["parameters"] for s in fmt.stop)

            _, rendered = asked_and_rendered(
                server.log_path, lambda n=name: client.chat(model=f"fmt-{n}", messages=CONVERSATION)
            )
            assert rendered is not None, f"no prompt in the debug log for {name}"
            # The tokenizer adds BOS from the GGUF's add_bos_token; the training text spells it out.
            expected = get_template(name, tokenizer=SimpleNamespace(eos_token=DEFAULT_EOS)).render_prompt(
                CONVERSATION
            )
            expected = expected.removeprefix("<|begin_of_text|>").removeprefix("<s>")
            assert rendered == expected, name


def test_gemma_and_plain_formats_have_their_end_markers_as_stops():
    from finetune.serve.modelfile import chat_format

    gemma = chat_format("gemma")
    assert gemma.stop == ["<end_of_turn>"] and "<start_of_turn>model" in gemma.template
    assert "<bos>" not in gemma.template  # Ollama adds BOS itself
    plain = chat_format("plain", eos="<|endoftext|>")
    assert plain.stop == ["<|endoftext|>"] and "{{ .Content }}<|endoftext|>" in plain.template


def test_modelfile_parts_are_the_runs_chat_format_and_parameters_for_every_modelfile():
    from finetune.config.loader import load_config
    from finetune.serve.modelfile import modelfile_parts

    cfg = load_config("release", overrides=["data.template=chatml", "data.max_seq_length=256"])
    parts = modelfile_parts(cfg, None, {"max_position_embeddings": 8192}, num_predict=40)
    assert parts.template == chat_format("chatml").template and parts.stops == chat_format("chatml").stop
    assert parts.model_context == 8192 and parts.parameters["num_predict"] == 40
    assert (
        parts.parameters["num_ctx"] >= 256 and parts.parameters["temperature"] == 0
    )  # the run's, trained context
