"""Evaluation probes: training questions (answers known) and held-out paraphrases, rendered as training did."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from finetune.data.templates import get_template
from finetune.evaluate.prompts import TOKENIZER_TEXTS, EvalPrompt, build_prompts


@pytest.fixture(scope="module")
def release_data(tmp_path_factory) -> Path:
    """The release profile's built-in data (train.jsonl + heldout.jsonl), prepared without a tokenizer."""
    from finetune.config.loader import load_config
    from finetune.data.prepare import prepare_for_run

    out = tmp_path_factory.mktemp("data")
    prepare_for_run(
        load_config("release", overrides=["data.num_examples=40", "data.template=chatml"]).data, out, None
    )
    return out


def test_build_prompts_pairs_questions_with_their_rendered_prompts(release_data):
    prompts = build_prompts(release_data, get_template("chatml"), n_train=6, n_heldout=4)
    assert [p.kind for p in prompts] == ["train"] * 6 + ["heldout"] * 4
    for p in prompts:
        assert p.prompt == f"<|im_start|>user\n{p.question}<|im_end|>\n<|im_start|>assistant\n"
        assert p.reference and p.messages == ({"role": "user", "content": p.question},)
    assert len({p.question for p in prompts}) == len(prompts)


def test_train_prompts_are_the_first_training_rows_with_their_references(release_data):
    rows = [json.loads(line) for line in (release_data / "train.jsonl").read_text().splitlines()[:3]]
    prompts = build_prompts(release_data, get_template("chatml"), n_train=3, n_heldout=0)
    assert [p.reference for p in prompts] == [r["reference"] for r in rows]
    assert [p.prompt for p in prompts] == [r["prompt"] for r in rows]  # exactly what training rendered
    assert [p.category for p in prompts] == [r.get("kind", "") for r in rows]


def test_build_prompts_renders_with_the_given_template(release_data):
    p = build_prompts(release_data, get_template("llama3"), n_train=1, n_heldout=0)[0]
    assert p.prompt.endswith("<|start_header_id|>assistant<|end_header_id|>\n\n") and p.question in p.prompt


def test_multi_turn_rows_ask_the_last_question_with_the_conversation(tmp_path):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2 + 3?"},
                {"role": "assistant", "content": "5"}, {"role": "user", "content": "And 4 + 4?"},
                {"role": "assistant", "content": "8"}]  # fmt: skip
    (tmp_path / "train.jsonl").write_text(json.dumps({"conversation": messages, "reference": "8"}) + "\n")
    (p,) = build_prompts(tmp_path, get_template("chatml"), n_train=5, n_heldout=5)
    assert (p.kind, p.question, p.reference) == ("train", "And 4 + 4?", "8")
    assert p.messages == tuple(messages[:-1])
    assert p.prompt == get_template("chatml").render_prompt(messages[:-1])


def test_heldout_paraphrases_are_marked_and_fresh_questions_are_not(release_data):
    rows = [json.loads(line) for line in (release_data / "heldout.jsonl").read_text().splitlines()]
    prompts = build_prompts(release_data, get_template("chatml"), n_train=0, n_heldout=len(rows))
    assert [p.paraphrase for p in prompts] == ["paraphrase_of" in r for r in rows]
    assert any(p.paraphrase for p in prompts) and not all(p.paraphrase for p in prompts)


def test_without_a_heldout_file_the_test_split_is_asked(release_data, tmp_path):
    """A dataset of your own has no paraphrases: its test split's questions are the unseen ones."""
    (tmp_path / "train.jsonl").write_text((release_data / "train.jsonl").read_text())
    prompts = build_prompts(tmp_path, get_template("chatml"), n_train=2, n_heldout=5)
    assert [p.kind for p in prompts] == ["train", "train"]  # no test split either: nothing held out
    (tmp_path / "test.jsonl").write_text((release_data / "test.jsonl").read_text())
    tests = [json.loads(line) for line in (tmp_path / "test.jsonl").read_text().splitlines()]
    prompts = build_prompts(tmp_path, get_template("chatml"), n_train=2, n_heldout=3)
    assert [p.kind for p in prompts] == ["train"] * 2 + ["heldout"] * 3
    assert [p.reference for p in prompts[2:]] == [r["reference"] for r in tests[:3]]
    assert not any(p.paraphrase for p in prompts)


def test_a_raw_text_training_row_has_no_question_to_ask(tmp_path):
    (tmp_path / "train.jsonl").write_text(json.dumps({"text": "Once upon a time", "reference": "x"}) + "\n")
    with pytest.raises(ValueError, match=r"train.jsonl: row 1 is raw text"):
        build_prompts(tmp_path, get_template("chatml"), n_train=1, n_heldout=0)


def test_tokenizer_texts_cover_what_differs_between_tokenizers():
    joined = "".join(TOKENIZER_TEXTS)
    for needle in (
        "½",
        "日本語",
        "🚀",
        "\t",
        "\r\n",
        "   ",
        "3.14159",
        "Don't",
        "https://",
        "@example",
        "{ sum",
        "4111111111111111",
        "ภาษาไทย",
        "العربية",
        "עברית",
        "\u00a0",
        "\u200b",
        "e\u0301",
        "<|im_end|>",
    ):
        assert needle in joined, needle
    assert any(t.startswith(" ") and not t.startswith("  ") for t in TOKENIZER_TEXTS)
    assert EvalPrompt("train", "q", "p", "r").messages == ()
