"""finetune.data.records: every row normalized to a conversation (or text), bad rows kept with line and reason."""

import json
from pathlib import Path

import pytest

from finetune.data.records import Rejection, load_records, normalize_record
from finetune.data.sources import DatasetError, Reject


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
    assert result.rejected == [] and result.rows_read == 6 and result.unit == "line"
    assert result.source == str(src)
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
    assert got[3] == "missing field 'output' (the row has: instruction)"
    assert 4 not in got  # blank lines are skipped, not rejected
    assert got[5] == "empty field 'output'"
    assert got[6] == "field 'completion' must be a string, got int"
    assert got[7] == "expected a JSON object, got list"
    assert got[8].startswith("unrecognized record (keys: answer, question)")
    assert got[9] == "conversation must end with an assistant message, not 'user'"
    assert got[10] == "messages[1].content is empty"
    assert str(result.rejected[1]) == "line 3: missing field 'output' (the row has: instruction)"
    assert result.rows_read == 10


def test_json_array_rejections_name_the_item(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([qa(1), {"text": 5}, qa(2)]))
    result = load_records(tmp_path / "a.json")
    assert len(result.examples) == 2 and result.unit == "item"
    assert [str(r) for r in result.rejected] == ["item 2: field 'text' must be a non-empty string"]


def test_csv_rows_and_a_chat_column_holding_json(tmp_path):
    src = tmp_path / "d.csv"
    src.write_text('instruction,input,output\nSay hi,,"Hi\nthere"\nSay bye,,\n\nCount,1 2,3\nbroken,row\n')
    result = load_records(src)
    assert [ex.line for ex in result.examples] == [2, 6]
    assert result.examples[0].messages[1]["content"] == "Hi\nthere"
    assert [str(r) for r in result.rejected] == [
        "line 4: empty field 'output'",
        "line 7: row has 2 columns, the header has 3",
    ]
    chat = tmp_path / "c.csv"
    cell = json.dumps(qa(1)["messages"]).replace('"', '""')
    chat.write_text(f'messages\n"{cell}"\n"[not json"\n', encoding="utf-8")
    result = load_records(chat)
    assert result.examples[0].messages == qa(1)["messages"]
    assert result.rejected[0].reason.startswith("field 'messages' is a string but not a JSON list")


def test_missing_file_is_file_not_found_naming_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="nope.jsonl"):
        load_records(tmp_path / "nope.jsonl")


def test_no_usable_rows_is_a_specific_error(tmp_path):
    src = write_lines(tmp_path / "x.jsonl", [{"instruction": "a"}, "oops", {"text": ""}, {"text": 1}])
    with pytest.raises(
        DatasetError,
        match=r"x.jsonl: no usable rows \(4 rejected: line 1: missing field 'output'.*; \.\.\.\)",
    ):
        load_records(src)
    (tmp_path / "empty.jsonl").write_text("\n\n")
    with pytest.raises(DatasetError, match="no usable rows \\(no records found\\)"):
        load_records(tmp_path / "empty.jsonl")


def test_hub_rows_are_numbered_as_rows():
    result = load_records(
        "hf://datasets/someone/ds", is_online=lambda: True, hub_loader=lambda r, s: [qa(1), {"x": 1}]
    )
    assert len(result.examples) == 1 and result.unit == "row"
    assert str(result.rejected[0]).startswith("row 2: unrecognized record")


def test_forced_format_aliases_and_unknown_format(tmp_path):
    src = write_lines(tmp_path / "d.jsonl", [{"text": "t", "prompt": "p", "completion": "c"}])
    assert load_records(src).examples[0].shape == "completion"
    assert load_records(src, format="text").examples[0].text == "t"
    assert load_records(src, format="prompt_completion").examples[0].messages[0]["content"] == "p"
    chat = write_lines(tmp_path / "c.jsonl", [qa(1)])
    assert load_records(chat, format="messages").examples[0].shape == "chat"
    with pytest.raises(DatasetError, match="unknown dataset format 'yaml'"):
        load_records(src, format="yaml")


@pytest.mark.parametrize(
    ("row", "reason"),
    [
        ({"messages": []}, "field 'messages' must be a non-empty list of messages"),
        ({"messages": ["hi"]}, "messages[0] must be an object, got str"),
        ({"messages": [{"role": "user"}]}, "messages[0] needs 'role' and 'content'"),
        ({"messages": [{"role": "user", "content": 1}]}, "messages[0].content must be a string, got int"),
        ({"conversations": None}, "missing field 'conversations'"),
        ({"prompt": "only a prompt"}, "missing field 'completion'"),
        ({"instruction": "i", "output": "o", "input": 3}, "field 'input' must be a string, got int"),
        ({}, "unrecognized record (keys: none)"),
    ],
)
def test_normalize_record_reasons(row, reason):
    with pytest.raises(Reject) as err:
        normalize_record(row, 1)
    assert str(err.value).startswith(reason)


def test_normalize_record_reference_and_kind():
    ex = normalize_record({**qa(3), "reference": "  ", "kind": 7}, 4)
    assert ex.reference == "Answer 3." and ex.kind is None and ex.line == 4  # blank reference: the answer
    bot = normalize_record(
        {"messages": [{"role": "user", "content": "q"}, {"role": "bot", "content": "a"}]}, 1
    )
    assert bot.messages[1]["role"] == "assistant"
    assert str(Rejection(3, "why", "item")) == "item 3: why"


def test_every_text_is_stripped_a_code_answers_indentation_too():
    """Leading spaces would merge with the template's newline into a token the served prompt never ends with."""
    body = "    n = len(s)\n    return n"
    chat = normalize_record(
        {
            "messages": [
                {"role": "user", "content": " Write it. "},
                {"role": "assistant", "content": f"\n{body}\n\n"},
            ]
        },
        1,
    )
    assert chat.messages[0]["content"] == "Write it." and chat.messages[1]["content"] == body.lstrip()
    assert chat.reference == body.lstrip()
    alpaca = normalize_record({"instruction": "Write it.", "output": body + "  "}, 2)
    assert alpaca.messages[-1]["content"] == body.lstrip()


def test_data_fields_map_a_datasets_own_column_names_to_ours():
    row = {"question": "What is 2+2?", "response": "4", "output": "ignored: response is the answer"}
    ex = normalize_record(row, 1, "auto", {"instruction": "question", "output": "response"})
    assert ex.messages == [{"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "4"}]
    with pytest.raises(Reject, match=r"missing field 'output' \(the row has: instruction, response\)"):
        normalize_record({"instruction": "q", "response": "a"}, 1)


def test_data_fields_only_name_fields_we_read():
    from finetune.config.loader import ConfigError, load_config

    with pytest.raises(ConfigError, match="unknown field answer: data.fields maps one of instruction"):
        load_config("quick", overrides=["data.fields.answer=response"])


def chat(*turns: dict) -> dict:
    return {"messages": list(turns)}


def test_openai_weight_zero_leaves_that_turn_untrained_and_text_parts_are_joined():
    from finetune.data.templates import get_template

    row = chat({"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]},
               {"role": "assistant", "content": "Old answer.", "weight": 0},
               {"role": "user", "content": "Again?"}, {"role": "assistant", "content": "New answer.", "weight": 1})  # fmt: skip
    ex = normalize_record(row, 1)
    assert ex.messages[0]["content"] == "Hi there" and [m.get("weight") for m in ex.messages] == [
        None,
        0,
        None,
        1,
    ]
    rendered = get_template("chatml").render(ex.messages)
    assert [rendered.text[a:b] for a, b in rendered.train_spans] == ["New answer.<|im_end|>"]
    row["messages"][3]["weight"] = None  # a Parquet/Arrow table fills the key in where a row lacks it
    assert "weight" not in normalize_record(row, 1).messages[3]


@pytest.mark.parametrize(
    ("turn", "reason"),
    [
        (
            {"role": "assistant", "content": None, "tool_calls": [{"id": "1"}]},
            r"messages\[1\] is a tool call",
        ),
        ({"role": "tool", "content": "42"}, r"messages\[1\] is a tool call or result \(role 'tool'\)"),
        (
            {"role": "assistant", "content": [{"type": "image_url"}]},
            r"content has image_url parts: only text",
        ),
        ({"role": "assistant", "content": "a", "weight": 0.5}, r"weight is 0.5: only assistant turns take a"),
        ({"role": "assistant", "content": "a", "weight": 0}, "every assistant turn has weight 0"),
    ],
)
def test_turns_that_cannot_train_are_rejected_with_the_real_reason(turn, reason):
    with pytest.raises(Reject, match=reason):
        normalize_record(chat({"role": "user", "content": "q"}, turn), 1)
