"""finetune.evaluate.base_answers: the base model's answers kept by the content of what produced them."""

from __future__ import annotations

from finetune.evaluate.base_answers import base_answers
from finetune.gates.parity import Answer


def test_the_base_answers_are_decoded_once_per_base_prompts_and_budget(tmp_path):
    base, calls = tmp_path / "base", []
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"weights")

    def generate():
        calls.append(1)
        return [Answer(f"answer {len(calls)}", "length", [1, 2], 7)]

    def ask(prompts=("q",), budget=24, folder=tmp_path / "kept"):
        return base_answers(folder, base, list(prompts), budget, generate)

    first = ask()
    assert ask() == first and len(calls) == 1  # kept, with every field (finish reason, tokens, prompt tokens)
    ask(budget=48), ask(prompts=("another q",))
    assert len(calls) == 3  # another budget, other prompts: decoded
    (base / "model.safetensors").write_bytes(b"other weights")
    assert ask() != first and len(calls) == 4  # another base (by content, not path): decoded
    for kept in (tmp_path / "kept").glob("*.json"):
        kept.write_text("{not json")
    ask()
    assert len(calls) == 5  # unreadable: decoded again
    ask(folder=None), ask(folder=None)
    assert len(calls) == 7  # no folder: never kept
