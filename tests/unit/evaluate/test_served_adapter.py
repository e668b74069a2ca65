"""The Ollama ADAPTER path's Modelfile and answer comparison (the served answers themselves are real in the fault
suite and tier 3: tests/faults, tests/e2e/test_end_to_end_mlx.py)."""

from __future__ import annotations

from pathlib import Path

from finetune.evaluate.served_adapter import _same, adapter_modelfile
from finetune.gates.parity import Answer
from tests.unit.recipes.test_export_adapter import a_run


def test_the_modelfile_serves_the_base_with_the_adapter_and_the_runs_own_chat_format(tmp_path, tiny_hf):
    from finetune.stages.rundir import own_config

    run = a_run(tmp_path, tiny_hf)
    out = run / "export" / "gguf-lora"
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_hf))
    text = adapter_modelfile(
        own_config(run, None), run, tokenizer, tiny_hf, out / "base-f16.gguf", out / "adapter.gguf", out
    )
    lines = text.splitlines()
    assert lines[:2] == ["FROM ./base-f16.gguf", "ADAPTER ./adapter.gguf"]
    assert (
        "<|im_start|>" in text and 'PARAMETER stop "<|im_end|>"' in text and "PARAMETER num_predict" in text
    )


def test_an_answer_cut_by_mlxs_budget_agrees_with_ollamas_longer_one_that_begins_with_it():
    assert _same(" Paris is big and old", Answer("Paris is big", "length"))
    assert not _same(" Paris is big and old", Answer("Paris is big", "stop"))
    assert not _same("Lyon", Answer("Paris is big", "length"))


def test_one_private_server_serves_every_modelfile_and_asks_each_model_every_question_set(tmp_path):
    from contextlib import contextmanager
    from types import SimpleNamespace

    from finetune.evaluate.served_adapter import ask_served

    log = []

    @contextmanager
    def server(binary, folder):
        log.append(("start", Path(folder).parent))
        created = set()

        def chat(model, messages):
            assert model in created, f"{model} was never created"
            return {"message": {"content": f"{model}: {messages[-1]['content']}"}}

        yield SimpleNamespace(create_model=lambda name, modelfile: created.add(name) or log.append(name),
                              client=lambda: SimpleNamespace(chat=chat))  # fmt: skip
        log.append("stop")

    q = lambda text: SimpleNamespace(messages=[{"role": "user", "content": text}])  # noqa: E731
    got = ask_served(Path("ollama"), tmp_path, {"My Run": tmp_path / "a", "b": tmp_path / "b"},
                     {"geo": [q("Capital?")], "math": [q("2+2?"), q("3+3?")]}, server)  # fmt: skip
    assert log == [("start", tmp_path), "ft-0-my-run", "ft-1-b", "stop"]  # Ollama's naming rules kept
    assert got["My Run"]["math"] == ["ft-0-my-run: 2+2?", "ft-0-my-run: 3+3?"] and got["b"]["geo"] == [
        "ft-1-b: Capital?"
    ]
    assert not list(tmp_path.glob(".ollama.*")), "the private store goes with the server"
