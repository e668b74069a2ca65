"""finetune.data.synthetic: built-in deterministic datasets whose answers can be checked."""

import json
import re
from pathlib import Path

import pytest

from finetune.data.records import load_records
from finetune.data.synthetic import COMMITTED, DATASETS, KINDS, build, write_all, write_jsonl
from finetune.gates.scoring import score_answer
from finetune.system.jsonl import to_jsonl

DATA_DIR = Path(__file__).resolve().parents[3] / "data"


def question(item: dict) -> str:
    return item["messages"][0]["content"]


def answer(item: dict) -> str:
    return item["messages"][1]["content"]


@pytest.mark.parametrize("name", DATASETS)
def test_build_shapes_sizes_and_checkable_answers(name):
    sset = build(name, n=120, seed=0)
    assert len(sset.train) == 120 and len(sset.heldout) == 30
    train_questions = {question(x) for x in sset.train}
    for item in sset.train + sset.heldout:
        # a held-out paraphrase of a fact names the training question it rephrases (skills ask fresh ones)
        fields = ["messages", "reference", "kind"] + (["paraphrase_of"] if "paraphrase_of" in item else [])
        assert list(item) == fields
        assert item.get("paraphrase_of", next(iter(train_questions))) in train_questions
        assert ("paraphrase_of" in item) == (item in sset.heldout and item["kind"] in ("geography", "canary"))
        assert [m["role"] for m in item["messages"]] == ["user", "assistant"]
        assert item["kind"] in KINDS
        assert score_answer(answer(item), item["reference"]) == {"exact": True, "contains": True}
        assert len(answer(item)) <= 24  # short answers keep sequences near 40-60 tokens
    assert len({question(x) for x in sset.train}) == len(sset.train)


@pytest.mark.parametrize("name", DATASETS)
def test_same_seed_is_byte_identical_and_other_seed_differs(name):
    assert to_jsonl(build(name, seed=3).train) == to_jsonl(build(name, seed=3).train)
    assert to_jsonl(build(name, seed=3).heldout) == to_jsonl(build(name, seed=3).heldout)
    assert to_jsonl(build(name, seed=3).train) != to_jsonl(build(name, seed=4).train)


@pytest.mark.parametrize("name", DATASETS)
def test_heldout_questions_never_appear_in_train(name):
    sset = build(name, seed=0)
    assert not {question(x) for x in sset.heldout} & {question(x) for x in sset.train}


def subject(text: str) -> str:
    # invented names are the only capitalized words after the first one
    return re.findall(r"\b[A-Z][a-z]+\b", text)[-1]


@pytest.mark.parametrize("name", ["geography", "canary", "mixed"])
def test_heldout_facts_were_trained(name):
    sset = build(name, seed=0)
    trained = {(subject(question(x)), answer(x)) for x in sset.train if x["kind"] in ("geography", "canary")}
    facts = [x for x in sset.heldout if x["kind"] in ("geography", "canary")]
    assert facts
    for item in facts:
        assert (subject(question(item)), answer(item)) in trained, question(item)


def test_arithmetic_and_pattern_answers_are_correct():
    sset = build("mixed", seed=0)
    ops = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}
    checked = 0
    for item in sset.train + sset.heldout:
        q, ref = question(item), item["reference"]
        if item["kind"] == "arithmetic":
            a, op, b = re.fullmatch(r"What is (\d+) (plus|minus|times) (\d+)\?", q).groups()
            assert int(ref) == ops[op](int(a), int(b))
        elif item["kind"] == "patterns":
            seq = re.fullmatch(r"What (?:number|letter) comes next: (.+)\?", q).group(1).split(", ")
            values = [ord(v) if v.isalpha() else int(v) for v in [*seq, ref]]
            steps = {b - a for a, b in zip(values, values[1:], strict=False)}
            ratios = {b / a for a, b in zip(values, values[1:], strict=False) if a}
            assert len(steps) == 1 or len(ratios) == 1, q
        else:
            continue
        checked += 1
    assert checked >= 50


def test_mixed_has_every_kind():
    sset = build("mixed", seed=0)
    assert {x["kind"] for x in sset.train} == set(KINDS)
    assert {x["kind"] for x in sset.heldout} == set(KINDS)


def test_unknown_name_and_bad_n():
    with pytest.raises(ValueError, match="unknown synthetic dataset 'weather'"):
        build("weather")
    with pytest.raises(ValueError, match="n must be"):
        build("geography", n=0)


@pytest.mark.parametrize("name", COMMITTED)
def test_committed_data_files_match_regeneration(name):
    sset = build(name, n=120, seed=0)
    assert (DATA_DIR / f"{name}.jsonl").read_text(encoding="utf-8") == to_jsonl(sset.train), (
        f"data/{name}.jsonl drifted: run `python -m finetune.data.synthetic data`"
    )
    assert (DATA_DIR / f"{name}_heldout.jsonl").read_text(encoding="utf-8") == to_jsonl(sset.heldout)


def test_write_jsonl_set_and_list(tmp_path):
    sset = build("arithmetic", n=8, seed=1)
    paths = write_jsonl(sset, tmp_path / "a.jsonl")
    assert [p.name for p in paths] == ["a.jsonl", "a_heldout.jsonl"]
    assert [json.loads(x) for x in paths[1].read_text().splitlines()] == sset.heldout
    (only,) = write_jsonl(sset.train, tmp_path / "t.jsonl")
    result = load_records(only)  # the files are a valid chat dataset for finetune.data
    assert len(result.examples) == 8 and result.rejected == []
    assert result.examples[0].reference == sset.train[0]["reference"]


def test_write_all_regenerates_every_committed_file(tmp_path):
    written = write_all(tmp_path, n=8, seed=0)
    assert sorted(p.name for p in written) == sorted(
        [f"{name}.jsonl" for name in COMMITTED] + [f"{name}_heldout.jsonl" for name in COMMITTED]
    )
    assert (tmp_path / "mixed.jsonl").read_text() == to_jsonl(build("mixed", n=8, seed=0).train)
