"""The general text the forgetting gate reads: never training data, varied enough to show damaged language."""

from __future__ import annotations

from pathlib import Path

from finetune.evaluate.general_text import GENERAL_TEXTS

DATA = Path(__file__).resolve().parents[3] / "data"


def test_no_general_text_shares_a_sentence_or_a_name_with_the_built_in_sets():
    committed = " ".join(p.read_text() for p in DATA.glob("*.jsonl"))
    for text in GENERAL_TEXTS:
        for sentence in text.replace("\n", ". ").split(". "):
            assert len(sentence) < 12 or sentence not in committed, sentence
    assert not any(word in committed for word in ("photosynthesis", "printing press", "checkmate"))


def test_the_set_mixes_prose_instructions_dialogue_and_code():
    assert len(GENERAL_TEXTS) == 12 and len(set(GENERAL_TEXTS)) == 12
    assert any(t.startswith("def ") for t in GENERAL_TEXTS)  # code
    assert any("\nB: " in t for t in GENERAL_TEXTS)  # dialogue
    assert any(t.startswith("Please ") for t in GENERAL_TEXTS)  # instructions
    assert all(len(t.split()) >= 15 for t in GENERAL_TEXTS)
