"""finetune.data.drops: each class of dropped row counted with its first lines, a threshold, the likely fix."""

from __future__ import annotations

import pytest

from finetune.data import drops
from finetune.data.sources import DatasetError


def report(rejected=(), dups=(), untrained=0, read=100) -> dict:
    return {
        "source": "mine.jsonl", "rows_read": read, "rows_used": read - len(rejected) - len(dups),
        "rejected": [{"line": line, "unit": "line", "reason": why} for line, why in rejected],
        "duplicates_removed": len(dups), "duplicate_lines": list(dups), "rows_without_trained_tokens": untrained,
        "max_seq_length": 64, "split_counts": {"train": 80, "valid": 10, "test": 10}, "truncated_share": 0.25,
    }  # fmt: skip


def test_rejections_are_grouped_by_kind_largest_first_with_their_first_lines():
    rows = [(i, f"row has {i % 3 + 4} columns, the header has 3") for i in range(2, 9)] + [
        (20, "invalid JSON (x)")
    ]
    got = drops.classes(report(rows, dups=[30, 31], untrained=1))
    assert [(c.reason, c.count) for c in got] == [
        ("row has N columns, the header has N", 7), ("duplicates removed", 2), ("invalid JSON", 1),
        ("rows with no trained token left after truncation to 64", 1)]  # fmt: skip
    assert got[0].lines == (2, 3, 4, 5, 6) and got[0].describe().startswith(
        "7 row has N columns, the header "
    )
    assert "(lines 2, 3, 4, 5, 6, ...; e.g. row has 6 columns" in got[0].describe()
    assert drops.dropped(report(rows, dups=[30, 31], untrained=1)) == 11


def test_the_summary_says_what_was_read_used_dropped_and_cut():
    lines = drops.summary(report([(4, "not valid UTF-8 (bad byte at byte 3)")]))
    assert lines == [
        "100 rows read from mine.jsonl, 99 used (80 train / 10 valid / 10 test)",
        "dropped: 1 not valid UTF-8 (line 4; e.g. not valid UTF-8 (bad byte at byte 3))",
        "25.0% of rows are cut to max_seq_length 64",
    ]


@pytest.mark.parametrize(
    ("reason", "fix"),
    [
        ("missing field 'output' (the row has: instruction, answer)", "set data.fields.output: answer"),
        ("missing field 'output' (the row has: instruction, foo)", "data.fields.output: <your column>"),
        (
            "unrecognized record (keys: answer, question)",
            "data.fields: {instruction: question, output: answer}",
        ),
        ("not valid UTF-8 (x)", "save it as UTF-8"),
    ],
)
def test_the_likely_fix_is_named(reason, fix):
    assert fix in drops.hint(report([(1, reason)] * 9))


def test_more_than_max_rejected_dropped_is_bad_input_naming_the_share_and_the_fix():
    drops.check(report([(1, "missing field 'output' (the row has: response)")] * 5), 0.05)  # 5%: allowed
    with pytest.raises(
        DatasetError, match=r"6 of 100 rows \(6%\) dropped, more than data.max_rejected 5%: 6 "
    ):
        drops.check(report([(1, "missing field 'output' (the row has: response)")] * 6), 0.05)
    with pytest.raises(DatasetError, match="raise data.max_seq_length"):
        drops.check(report(untrained=50), 0.05)
