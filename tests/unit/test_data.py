import json
from pathlib import Path

import pytest

from finetune.data import (
    DatasetError,
    load_records,
    prepare,
    split_counts,
)
from finetune.templates import get_template
from finetune.tokens import tokenize_example


def write_lines(path: Path, lines: list) -> Path:
    path.write_text(
        "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines), encoding="utf-8"
    )
    return path


def qa(i: int) -> dict:
    return {
        "messages": [
            {"role": "user", "content": f"Question {i}?"},
            {"role": "assistant", "content": f"Answer {i}."},
        ]
    }


# ---------------------------------------------------------------- load_records


def test_jsonl_shapes_are_detected_and_normalized(tmp_path):
    src = write_lines(
        tmp_path / "d.jsonl",
        [
            {"instruction": "Add.", "input": "2 and 3", "output": "5"},
            {"instruction": "Greet.", "output": "Hi", "system": "Be kind."},
            {"prompt": "Capital of Zorbania?", "completion": " Velmora. "},
            {"text": "Raw text to learn."},
            {"conversations": [{"from": "human", "value": "Hey"}, {"from": "gpt", "value": "Yo"}]},
            {**qa(1), "reference": "1", "kind": "arith"},
        ],
    )
    result = load_records(src)
    assert result.rejected == []
    assert result.rows_read == 6
    shapes = [ex.shape for ex in result.examples]
    assert shapes == ["alpaca", "alpaca", "completion", "text", "chat", "chat"]
    alpaca, system, completion, text, sharegpt, chat = result.examples
    assert alpaca.messages == [
        {"role": "user", "content": "Add.\n\n2 and 3"},
        {"role": "assistant", "content": "5"},
    ]
    assert alpaca.reference == "5"
    assert system.messages[0] == {"role": "system", "content": "Be kind."}
    assert completion.messages[1] == {"role": "assistant", "content": "Velmora."}
    assert text.text == "Raw text to learn." and text.messages is None
    assert sharegpt.messages == [{"role": "user", "content": "Hey"}, {"role": "assistant", "content": "Yo"}]
    assert (chat.reference, chat.kind, chat.line) == ("1", "arith", 6)


def test_bad_jsonl_rows_are_reported_with_line_and_reason(tmp_path):
    src = write_lines(
        tmp_path / "d.jsonl",
        [
            qa(1),
            "{not json",
            {"instruction": "Do it."},
            "",
            {"instruction": "Do it.", "output": "   "},
            {"prompt": "p", "completion": 42},
            "[1, 2]",
            {"question": "q", "answer": "a"},
            {"messages": [{"role": "user", "content": "only a question"}]},
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": ""}]},
            qa(2),
        ],
    )
    result = load_records(src)
    assert [ex.line for ex in result.examples] == [1, 11]
    got = {r.line: r.reason for r in result.rejected}
    assert got[2].startswith("invalid JSON")
    assert got[3] == "missing field 'output'"
    assert 4 not in got  # blank lines are skipped, not rejected
    assert got[5] == "empty field 'output'"
    assert got[6] == "field 'completion' must be a string, got int"
    assert got[7] == "expected a JSON object, got list"
    assert got[8].startswith("unrecognized record (keys: answer, question)")
    assert got[9] == "conversation must end with an assistant message, not 'user'"
    assert got[10] == "messages[1].content is empty"
    assert str(result.rejected[1]) == "line 3: missing field 'output'"
    assert result.rows_read == 10


def test_json_array_and_data_object_use_item_numbers(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([qa(1), {"text": 5}, qa(2)]))
    result = load_records(tmp_path / "a.json")
    assert len(result.examples) == 2
    assert [str(r) for r in result.rejected] == ["item 2: field 'text' must be a non-empty string"]

    (tmp_path / "b.json").write_text(json.dumps({"data": [qa(1)]}))
    assert len(load_records(tmp_path / "b.json").examples) == 1


def test_invalid_json_file_names_file_line_and_column(tmp_path):
    (tmp_path / "bad.json").write_text('[\n  {"text": "a"},\n  {"text": }\n]')
    with pytest.raises(DatasetError, match=r"bad.json: invalid JSON at line 3 column 12"):
        load_records(tmp_path / "bad.json")
    (tmp_path / "obj.json").write_text('{"rows": []}')
    with pytest.raises(DatasetError, match="expected a JSON array"):
        load_records(tmp_path / "obj.json")


def test_csv_rows_keep_physical_line_numbers(tmp_path):
    src = tmp_path / "d.csv"
    src.write_text(
        'instruction,input,output\nSay hi,,"Hi\nthere"\nSay bye,,\n\nCount,1 2,3\nbroken,row\n',
        encoding="utf-8",
    )
    result = load_records(src)
    assert [ex.line for ex in result.examples] == [2, 6]
    assert result.examples[0].messages[1]["content"] == "Hi\nthere"
    assert [str(r) for r in result.rejected] == [
        "line 4: empty field 'output'",
        "line 7: row has 2 columns, the header has 3",
    ]


def test_csv_chat_column_may_hold_json(tmp_path):
    src = tmp_path / "d.csv"
    cell = json.dumps(qa(1)["messages"]).replace('"', '""')
    src.write_text(f'messages\n"{cell}"\n', encoding="utf-8")
    assert load_records(src).examples[0].messages == qa(1)["messages"]


def test_missing_file_is_file_not_found_naming_the_path(tmp_path):
    missing = tmp_path / "nope.jsonl"
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_records(missing)


def test_no_usable_rows_is_a_specific_error(tmp_path):
    src = write_lines(tmp_path / "x.jsonl", [{"instruction": "a"}, "oops", {"text": ""}])
    with pytest.raises(
        DatasetError, match=r"x.jsonl: no usable rows \(3 rejected: line 1: missing field 'output'"
    ):
        load_records(src)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DatasetError, match="no usable rows \\(no records found\\)"):
        load_records(tmp_path / "empty.jsonl")


def test_hub_id_offline_says_no_network_and_names_local_options():
    with pytest.raises(DatasetError, match="no network") as err:
        load_records("someone/some-dataset", is_online=lambda: False)
    assert ".jsonl" in str(err.value) and "save_to_disk" in str(err.value)
    assert isinstance(err.value, FileNotFoundError)


def test_hub_id_online_uses_the_injected_loader():
    calls = []

    def hub_loader(repo_id, split):
        calls.append((repo_id, split))
        return [qa(1), {"bad": 1}]

    result = load_records("hf://datasets/someone/ds", is_online=lambda: True, hub_loader=hub_loader)
    assert calls == [("someone/ds", "train")]
    assert len(result.examples) == 1
    assert str(result.rejected[0]).startswith("row 2: unrecognized record")


def test_saved_datasets_folder_loads(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [qa(i) for i in range(3)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    assert len(load_records(tmp_path / "single").examples) == 3
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(tmp_path / "dict"))
    assert len(load_records(tmp_path / "dict").examples) == 2
    with pytest.raises(DatasetError, match="no split 'test'"):
        load_records(tmp_path / "dict", split="test")


def test_plain_folder_is_rejected(tmp_path):
    with pytest.raises(DatasetError, match="not one saved with datasets' save_to_disk"):
        load_records(tmp_path)


def test_forced_format_and_unknown_format(tmp_path):
    src = write_lines(tmp_path / "d.jsonl", [{"text": "t", "prompt": "p", "completion": "c"}])
    assert load_records(src).examples[0].shape == "completion"
    assert load_records(src, format="text").examples[0].text == "t"
    with pytest.raises(DatasetError, match="unknown dataset format 'yaml'"):
        load_records(src, format="yaml")


# ---------------------------------------------------------------- prepare


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines()]


def test_prepare_writes_mlx_layout_with_spans_and_report(tmp_path):
    rows = [qa(i) for i in range(20)] + [qa(3), qa(5), {"instruction": "x"}]
    src = write_lines(tmp_path / "src.jsonl", rows)
    report = prepare(src, tmp_path / "out", template="chatml", seed=1)

    assert report.rows_read == 23 and report.rows_used == 20
    assert report.duplicates_removed == 2 and report.duplicate_lines == [21, 22]
    assert [str(r) for r in report.rejected] == ["line 23: missing field 'output'"]
    assert report.split_counts == {"train": 16, "valid": 2, "test": 2}
    assert report.length_unit == "chars" and report.truncated_share is None
    assert any("need a tokenizer" in n for n in report.notes)

    seen = []
    for split, count in report.split_counts.items():
        lines = read_jsonl(tmp_path / "out" / f"{split}.jsonl")
        assert len(lines) == count
        for row in lines:
            assert list(row) == ["text", "train_spans", "prompt", "reference"]
            ((s, e),) = row["train_spans"]
            assert row["text"][s:e] == row["reference"] + "<|im_end|>"
            assert row["text"].startswith(row["prompt"]) and row["prompt"].endswith("<|im_start|>assistant\n")
            seen.append(row["reference"])
    assert sorted(seen) == sorted(f"Answer {i}." for i in range(20))

    on_disk = json.loads((tmp_path / "out" / "prepare_report.json").read_text())
    assert on_disk == json.loads(json.dumps(report.to_dict()))
    assert on_disk["rejected"] == [{"line": 23, "unit": "line", "reason": "missing field 'output'"}]


def test_prepare_is_deterministic_per_seed(tmp_path):
    src = write_lines(tmp_path / "src.jsonl", [qa(i) for i in range(30)])
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        prepare(src, tmp_path / name, template="llama3", seed=seed)
    a, b, c = ((tmp_path / n / "train.jsonl").read_bytes() for n in "abc")
    assert a == b
    assert a != c


def test_prepare_multiturn_spans_and_mask_prompt_off(tmp_path):
    conv = {
        "messages": [
            {"role": "user", "content": "A?"},
            {"role": "assistant", "content": "a"},
            {"role": "user", "content": "B?"},
            {"role": "assistant", "content": "b"},
        ]
    }
    variants = [
        {"messages": [dict(m, content=m["content"] + str(i)) for m in conv["messages"]]} for i in range(3)
    ]
    src = write_lines(tmp_path / "src.jsonl", variants)
    prepare(src, tmp_path / "m", template="chatml")
    row = read_jsonl(tmp_path / "m" / "train.jsonl")[0]
    i = row["reference"][1:]
    assert [row["text"][s:e] for s, e in row["train_spans"]] == [f"a{i}<|im_end|>", f"b{i}<|im_end|>"]
    prepare(src, tmp_path / "u", template="chatml", mask_prompt=False)
    row = read_jsonl(tmp_path / "u" / "train.jsonl")[0]
    assert row["train_spans"] == [[0, len(row["text"])]]


def test_prepare_text_rows_are_trained_whole(tmp_path):
    src = write_lines(tmp_path / "src.jsonl", [{"text": f"line {i}"} for i in range(3)])
    report = prepare(src, tmp_path / "o", template="chatml")
    row = read_jsonl(tmp_path / "o" / "train.jsonl")[0]
    assert row == {"text": row["text"], "train_spans": [[0, 6]], "prompt": "", "reference": ""}
    assert report.shapes == {"text": 3}


def test_prepare_keeps_kind_for_evaluation(tmp_path):
    src = write_lines(tmp_path / "src.jsonl", [{**qa(i), "reference": str(i), "kind": "k"} for i in range(3)])
    prepare(src, tmp_path / "o", template="chatml")
    row = read_jsonl(tmp_path / "o" / "test.jsonl")[0]
    assert list(row) == ["text", "train_spans", "prompt", "reference", "kind"] and row["kind"] == "k"


def test_prepare_too_small_dataset_says_so(tmp_path):
    src = write_lines(tmp_path / "src.jsonl", [qa(1), qa(2)])
    with pytest.raises(DatasetError, match="only 2 usable rows: too few for splits"):
        prepare(src, tmp_path / "o", template="chatml")
    assert not (tmp_path / "o" / "train.jsonl").exists()


def test_split_counts():
    assert split_counts(3, (0.8, 0.1, 0.1)) == {"train": 1, "valid": 1, "test": 1}
    assert split_counts(100, (0.8, 0.1, 0.1)) == {"train": 80, "valid": 10, "test": 10}
    assert split_counts(10, (0.5, 0.25, 0.25)) == {"train": 6, "valid": 2, "test": 2}
    with pytest.raises(ValueError, match="summing to 1"):
        split_counts(10, (0.8, 0.2, 0.1))
    with pytest.raises(ValueError, match="three fractions"):
        split_counts(10, (0.9, 0.1))
    with pytest.raises(ValueError):
        split_counts(10, (1.0, 0.0, 0.0))


def test_prepared_files_are_a_text_dataset_for_mlx_lm(tmp_path):
    mlx_datasets = pytest.importorskip("mlx_lm.tuner.datasets")
    src = write_lines(tmp_path / "src.jsonl", [qa(i) for i in range(5)])
    prepare(src, tmp_path / "o", template="chatml")
    rows = read_jsonl(tmp_path / "o" / "train.jsonl")

    class Config:
        mask_prompt = False

    assert type(mlx_datasets.create_dataset(rows, None, Config())).__name__ == "TextDataset"


# ---------------------------------------------------------------- tokenizing


MULTI = [
    {"role": "user", "content": "Capital of Zorbania?"},
    {"role": "assistant", "content": "Velmora."},
    {"role": "user", "content": "And its river?"},
    {"role": "assistant", "content": "The Ossen River."},
]


def test_tokenize_example_masks_every_assistant_turn(smollm2_tokenizer):
    tok = smollm2_tokenizer
    rendered = get_template("chatml").render(MULTI)
    ids, mask = tokenize_example(tok, rendered.text, rendered.train_spans, 512)
    assert ids == tok(rendered.text, add_special_tokens=False)["input_ids"]
    assert len(mask) == len(ids)
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tok.decode(trained) == "Velmora.<|im_end|>The Ossen River.<|im_end|>"
    # the two trained runs are separate: the second user turn is masked
    runs = "".join(map(str, mask)).strip("0").split("0")
    assert len([r for r in runs if r]) == 2


def test_tokenize_example_mask_off_and_truncation(smollm2_tokenizer):
    rendered = get_template("chatml").render(MULTI)
    ids, mask = tokenize_example(
        smollm2_tokenizer, rendered.text, rendered.train_spans, 512, mask_prompt=False
    )
    assert mask == [1] * len(ids)
    short_ids, short_mask = tokenize_example(smollm2_tokenizer, rendered.text, rendered.train_spans, 10)
    assert short_ids == ids[:10] and len(short_mask) == 10 and not any(short_mask)
    with pytest.raises(ValueError, match="max_seq_length"):
        tokenize_example(smollm2_tokenizer, rendered.text, rendered.train_spans, 0)


def test_prepare_with_tokenizer_reports_token_stats(tmp_path, smollm2_tokenizer):
    src = write_lines(tmp_path / "src.jsonl", [qa(i) for i in range(10)] + [qa(10**40)])
    report = prepare(src, tmp_path / "o", template="chatml", tokenizer=smollm2_tokenizer, max_seq_length=25)
    stats = report.length_stats
    assert report.length_unit == "tokens"
    assert stats["min"] <= stats["p50"] <= stats["p95"] <= stats["max"]
    long_text = get_template("chatml").render(qa(10**40)["messages"]).text
    longest = len(smollm2_tokenizer(long_text, add_special_tokens=False)["input_ids"])
    assert stats["max"] == longest > 25
    assert report.truncated_share == pytest.approx(1 / 11, abs=1e-4)


class WordTokenizer:
    """Fast-tokenizer stand-in: whitespace words, with a BOS it adds by default like Llama's."""

    bos_token, bos_token_id = "<s>", 0

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        offsets, pos = [], 0
        for word in text.split():
            start = text.index(word, pos)
            offsets.append((start, start + len(word)))
            pos = start + len(word)
        ids = [len(text[s:e]) + 1 for s, e in offsets]
        if add_special_tokens:
            ids, offsets = [0, *ids], [(0, 0), *offsets]
        return {"input_ids": ids, "offset_mapping": offsets}


def test_tokenize_example_prepends_bos_like_the_default_encode():
    ids, mask = tokenize_example(WordTokenizer(), "ask this answer that", [(9, 20)], 99)
    assert ids == [0, 4, 5, 7, 5] and mask == [0, 0, 0, 1, 1]
    ids, _ = tokenize_example(WordTokenizer(), "<s> already", [(0, 3)], 99)
    assert ids[0] == 4  # the text carries its own BOS: none added


def test_tokenize_example_needs_offsets():
    class SlowTokenizer:
        def __call__(self, text, **kwargs):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")

    with pytest.raises(TypeError, match="fast"):
        tokenize_example(SlowTokenizer(), "x", [(0, 1)], 8)


class HistoryDroppingTokenizer:
    """A chat template that shows only the last two messages: fine for one turn, not prefix-stable beyond."""

    eos_token, chat_template = "<eos>", "fake"

    def apply_chat_template(self, messages, tokenize=False, add_generation_prompt=False):
        text = "".join(f"[{m['role']}]{m['content']}<end>" for m in messages[-2:])
        return text + ("[assistant]" if add_generation_prompt else "")


def test_prepare_rejects_rows_the_template_cannot_render(tmp_path):
    two_turns = {"messages": [*qa(9)["messages"], *qa(8)["messages"]]}
    template = get_template("tokenizer", HistoryDroppingTokenizer())
    src = write_lines(tmp_path / "src.jsonl", [qa(1), two_turns, qa(2), qa(3)])
    report = prepare(src, tmp_path / "o", template=template)
    assert report.rows_used == 3
    assert [r.line for r in report.rejected] == [2]
    assert (
        "template 'tokenizer'" in report.rejected[0].reason and "prefix-stable" in report.rejected[0].reason
    )

    only_bad = write_lines(tmp_path / "bad.jsonl", [two_turns])
    with pytest.raises(DatasetError, match=r"no usable rows after rendering \(1 rejected: line 1: template"):
        prepare(only_bad, tmp_path / "o2", template=template)
