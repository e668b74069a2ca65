"""Stage keys: the user's files by content, the tools by version, and what changed said in words."""

from __future__ import annotations

from dataclasses import replace
from types import SimpleNamespace

from finetune.config.loader import load_config
from finetune.stages import keys
from finetune.stages.context import Ctx
from finetune.stages.keys import CONVERTER, OLLAMA
from finetune.system.hashing import dir_sha256, file_sha256
from tests.fakes import fake_deps


def ctx(tmp_path, tokenizer, *sets, **deps) -> Ctx:
    d = replace(fake_deps(tokenizer, tmp_path / "m"), **deps)
    return Ctx(load_config("quick", overrides=list(sets)), tmp_path, d, lambda _: None, "run", ())


def test_a_data_file_or_saved_folder_is_keyed_by_content_a_builtin_set_by_name(tmp_path, toy_tokenizer):
    data = tmp_path / "mine.jsonl"
    data.write_text('{"text": "a"}\n')
    content = keys.content(ctx(tmp_path, toy_tokenizer, f"data.source={data}"), "data")
    assert content == {"data.source": {"path": str(data), "sha256": file_sha256(data)}}
    data.write_text('{"text": "b"}\n')  # same path, same size
    assert keys.content(ctx(tmp_path, toy_tokenizer, f"data.source={data}"), "data") != content
    saved = tmp_path / "saved"
    saved.mkdir()
    (saved / "state.json").write_text("{}")
    folder = keys.content(ctx(tmp_path, toy_tokenizer, f"data.source={saved}"), "data")
    assert folder["data.source"]["sha256"] == dir_sha256(saved)[0]
    assert keys.content(ctx(tmp_path, toy_tokenizer), "data") == {}  # builtin:mixed: the code makes it
    assert keys.content(ctx(tmp_path, toy_tokenizer), "train") == {}


def test_a_local_model_folder_is_keyed_by_content_a_packaged_one_by_its_artifact(tmp_path, toy_tokenizer):
    model = tmp_path / "my-model"
    model.mkdir()
    (model / "config.json").write_text("{}")
    local = keys.content(ctx(tmp_path, toy_tokenizer, f"model.name={model}"), "model")
    assert local == {"model.name": {"path": str(model), "sha256": dir_sha256(model)[0]}}
    assert keys.content(ctx(tmp_path, toy_tokenizer, "model.name=smollm2-135m"), "model") == {}


def test_each_stage_holds_the_versions_of_what_makes_its_output(tmp_path, toy_tokenizer):
    asked = []
    c = ctx(tmp_path, toy_tokenizer, tool_version=lambda name: asked.append(name) or f"{name}-1",
            locate_ollama=lambda: SimpleNamespace(binary=tmp_path / "ollama"),
            ollama_version=lambda binary: f"0.6 at {binary.name}")  # fmt: skip
    assert keys.tools(c, "train") == {"mlx": "mlx-1", "mlx-lm": "mlx-lm-1", "transformers": "transformers-1",
                                            "tokenizers": "tokenizers-1"}  # fmt: skip
    assert keys.tools(c, "gguf")[CONVERTER] == f"{CONVERTER}-1"
    assert keys.tools(c, "ollama") == {OLLAMA: "0.6 at ollama"}
    assert keys.tools(c, "evaluate")["xllamacpp"] == "xllamacpp-1"
    assert keys.tools(c, "evaluate")[OLLAMA] == "0.6 at ollama" and OLLAMA not in asked
    assert keys.tools(c, "estimate") == {}
    gone = replace(c, deps=replace(c.deps, locate_ollama=lambda: SimpleNamespace(binary=None)))
    assert keys.tools(gone, "ollama") == {OLLAMA: None}


def test_input_changes_name_the_file_the_tool_and_the_other_keys():
    was = {"data": {"seed": 0}, "content": {"data.source": {"path": "/d.jsonl", "sha256": "a" * 64}},
           "tools": {"mlx": "0.31", "mlx-lm": "0.32"}, "code": "1"}  # fmt: skip
    now = {**was, "content": {"data.source": {"path": "/d.jsonl", "sha256": "b" * 64}},
           "tools": {"mlx": "0.32", "mlx-lm": "0.32", "torch": "2.1"}, "code": "2"}  # fmt: skip
    assert keys.input_changes(was, now) == [
        f"/d.jsonl (data.source) changed since it was recorded (sha256 {'a' * 12}… → {'b' * 12}…)",
        "mlx 0.31 → 0.32",
        "torch absent → 2.1",
        "inputs changed: code",
    ]
    builtin = {**was, "content": {}}
    assert keys.input_changes(builtin, was) == ["data.source: not a local file then, /d.jsonl now"]
    assert keys.input_changes(was, was) == ["inputs changed: recorded in another form"]
