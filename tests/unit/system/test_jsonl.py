"""finetune.system.jsonl: strict reading of our own files, tolerant reading of logs a crash may have torn."""

import json

import pytest

from finetune.system.jsonl import read_jsonl, read_log, to_jsonl

ROWS = [{"step": 1, "text": "Velmora \u00bd"}, {"step": 2, "nested": {"a": [1, 2]}}]


def test_to_jsonl_round_trips_and_keeps_unicode(tmp_path):
    text = to_jsonl(ROWS)
    assert text.count("\n") == 2 and text.endswith("\n")
    assert "\u00bd" in text  # not escaped: the files stay readable
    path = tmp_path / "rows.jsonl"
    path.write_text(text, encoding="utf-8")
    assert read_jsonl(path) == ROWS == read_log(path)
    assert to_jsonl([]) == ""


def test_read_jsonl_skips_blank_lines_and_names_file_and_line_of_a_bad_one(tmp_path):
    path = tmp_path / "split.jsonl"
    path.write_text(json.dumps(ROWS[0]) + "\n\n   \n" + json.dumps(ROWS[1]) + "\n")
    assert read_jsonl(path) == ROWS
    path.write_text(json.dumps(ROWS[0]) + "\n\n{torn\n")
    with pytest.raises(ValueError, match=rf"^{path}:3: invalid JSON \("):
        read_jsonl(path)
    with pytest.raises(FileNotFoundError):
        read_jsonl(tmp_path / "missing.jsonl")


def test_read_log_skips_a_torn_line_and_a_missing_file_is_empty(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text(to_jsonl(ROWS) + '{"step": 3, "train_lo')  # killed mid-write
    assert read_log(path) == ROWS
    assert read_log(tmp_path / "never-written.jsonl") == []
