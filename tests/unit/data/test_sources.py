"""finetune.data.sources: each reader yields (1-based position, row or Reject); whole-file problems raise."""

import json

import pytest

from finetune.data.sources import (
    DatasetError,
    DatasetNotFoundError,
    Reject,
    hub_reachable,
    rows_of,
)
from finetune.errors import UserError


def no_network():
    raise AssertionError("a local source must never ask about the network")


def no_hub(repo_id, split):
    raise AssertionError("a local source must never reach the Hub")


def read(source, split="train", is_online=no_network, hub_loader=no_hub):
    unit, rows = rows_of(str(source), split, is_online, hub_loader)
    return unit, list(rows)


def reasons(rows):
    return {pos: str(row) for pos, row in rows if isinstance(row, Reject)}


def test_jsonl_positions_are_physical_lines(tmp_path):
    src = tmp_path / "d.jsonl"
    src.write_bytes(b'{"text": "a"}\n\n  \n{broken\n\xff\xfe\n[1, 2]\n')
    unit, rows = read(src)
    assert unit == "line"
    assert [pos for pos, _ in rows] == [1, 4, 5, 6]  # blank lines are skipped, not counted as rows
    assert rows[0] == (1, {"text": "a"}) and rows[3] == (6, [1, 2])
    got = reasons(rows)
    assert got[4].startswith("invalid JSON (") and "at column 2" in got[4]
    assert got[5].startswith("not valid UTF-8 (")


def test_json_array_items_and_data_object(tmp_path):
    (tmp_path / "a.json").write_text(json.dumps([{"text": "x"}, 5]))
    assert read(tmp_path / "a.json") == ("item", [(1, {"text": "x"}), (2, 5)])
    (tmp_path / "b.json").write_text(json.dumps({"data": [{"text": "y"}]}))
    assert read(tmp_path / "b.json") == ("item", [(1, {"text": "y"})])


def test_bad_json_files_name_file_line_and_column(tmp_path):
    (tmp_path / "bad.json").write_text('[\n  {"text": "a"},\n  {"text": }\n]')
    with pytest.raises(DatasetError, match=r"bad.json: invalid JSON at line 3 column 12"):
        read(tmp_path / "bad.json")
    (tmp_path / "obj.json").write_text('{"rows": []}')
    with pytest.raises(DatasetError, match="expected a JSON array"):
        read(tmp_path / "obj.json")
    (tmp_path / "latin.json").write_bytes(b'["\xe9"]')
    with pytest.raises(DatasetError, match="latin.json: line 1: not valid UTF-8"):
        read(tmp_path / "latin.json")


def test_csv_rows_keep_physical_line_numbers(tmp_path):
    src = tmp_path / "d.csv"
    src.write_text(
        'instruction,input,output\nSay hi,,"Hi\nthere"\nSay bye,,\n\nCount,1 2,3\nbroken,row\n',
        encoding="utf-8",
    )
    unit, rows = read(src)
    assert unit == "line" and [pos for pos, _ in rows] == [2, 4, 6, 7]
    assert rows[0][1] == {"instruction": "Say hi", "input": "", "output": "Hi\nthere"}
    assert reasons(rows) == {7: "row has 2 columns, the header has 3"}
    (tmp_path / "header.csv").write_text("text\n")
    assert read(tmp_path / "header.csv") == ("line", [])


def test_unsupported_and_missing_files(tmp_path):
    (tmp_path / "d.yaml").write_text("a: 1\n")
    with pytest.raises(DatasetError, match=r"d.yaml: unsupported file type '.yaml'; use one of .jsonl"):
        read(tmp_path / "d.yaml")
    with pytest.raises(DatasetNotFoundError, match="nope.jsonl: dataset file not found") as err:
        read(tmp_path / "nope.jsonl")
    assert isinstance(err.value, FileNotFoundError) and isinstance(err.value, UserError)


def test_hub_id_offline_says_no_network_and_names_local_options():
    with pytest.raises(DatasetNotFoundError, match="no network") as err:
        read("someone/some-dataset", is_online=lambda: False)
    assert ".jsonl" in str(err.value) and "save_to_disk" in str(err.value)


@pytest.mark.parametrize(
    "spec", ["someone/ds", "hf://datasets/someone/ds", "hf:someone/ds", "hf://someone/ds"]
)
def test_hub_id_online_uses_the_injected_loader(spec):
    calls = []

    def hub_loader(repo_id, split):
        calls.append((repo_id, split))
        return [{"text": "a"}, {"bad": 1}]

    assert read(spec, "valid", lambda: True, hub_loader) == ("row", [(1, {"text": "a"}), (2, {"bad": 1})])
    assert calls == [("someone/ds", "valid")]


def test_hub_is_unreachable_when_offline_is_asked_for(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub_reachable() is False
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    assert hub_reachable() is False


def test_saved_datasets_and_parquet(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [{"text": f"t{i}"} for i in range(3)]
    datasets.Dataset.from_list(rows).save_to_disk(str(tmp_path / "single"))
    assert read(tmp_path / "single") == ("row", list(enumerate(rows, 1)))
    datasets.DatasetDict({"train": datasets.Dataset.from_list(rows[:2])}).save_to_disk(str(tmp_path / "dict"))
    assert read(tmp_path / "dict") == ("row", list(enumerate(rows[:2], 1)))
    with pytest.raises(DatasetError, match=r"no split 'test' \(splits: train\)"):
        read(tmp_path / "dict", split="test")
    datasets.Dataset.from_list(rows).to_parquet(str(tmp_path / "d.parquet"))
    assert read(tmp_path / "d.parquet") == ("row", list(enumerate(rows, 1)))


def test_plain_folder_is_rejected(tmp_path):
    with pytest.raises(DatasetError, match="not one saved with datasets' save_to_disk"):
        read(tmp_path)


def test_jsonl_saved_as_json_and_the_reverse_say_which_it_is(tmp_path):
    rows = [{"instruction": f"q{i}", "output": f"a{i}"} for i in range(3)]
    (tmp_path / "a.json").write_text("".join(json.dumps(r) + "\n" for r in rows))
    with pytest.raises(
        DatasetError, match=r"a.json: invalid JSON at line 2 column 1: Extra data; this looks like JSON Lines"
    ):
        read(tmp_path / "a.json")
    (tmp_path / "b.jsonl").write_text(json.dumps(rows, indent=2))
    with pytest.raises(
        DatasetError, match=r"b.jsonl: starts with '\[': this looks like a JSON array.*rename it to b.json"
    ):
        read(tmp_path / "b.jsonl")


def test_a_latin1_csv_names_the_line_of_its_first_bad_byte_not_the_header(tmp_path):
    body = "instruction,output\n" + "".join(f"q{i},a{i}\n" for i in range(900))  # past the first 8 KiB block
    (tmp_path / "l.csv").write_bytes(body.encode() + "café,x\n".encode("latin-1"))
    with pytest.raises(
        DatasetError, match=r"l.csv: line 902: not valid UTF-8 \(byte 0xe9 .*save it as UTF-8"
    ):
        read(tmp_path / "l.csv")


def test_a_byte_order_mark_is_not_part_of_the_first_column(tmp_path):
    (tmp_path / "x.csv").write_bytes("\ufeffinstruction,output\nq,a\n".encode())
    assert read(tmp_path / "x.csv") == ("line", [(2, {"instruction": "q", "output": "a"})])
