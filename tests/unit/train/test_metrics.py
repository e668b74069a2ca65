"""finetune.train.metrics: the metrics.jsonl log, its readers, and truncation at a resume point."""

import json

from finetune.train.metrics import METRICS, read_metrics, train_losses, truncate_metrics, val_losses

ROWS = [
    {"kind": "val", "step": 0, "val_loss": 3.0},
    {"kind": "train", "step": 1, "train_loss": 2.9},
    {"kind": "train", "step": 2, "train_loss": 2.7},
    {"kind": "val", "step": 2, "val_loss": 2.6},
    {"kind": "train", "step": 3, "train_loss": 2.5},
    {"kind": "train", "step": 4, "train_loss": 2.2},
    {"kind": "val", "step": 4, "val_loss": 2.1},
]


def write(path, rows, tail=""):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + tail)
    return path


def test_readers_sort_by_step_and_split_by_kind(tmp_path):
    shuffled = [ROWS[4], ROWS[0], ROWS[6], ROWS[1], ROWS[3], ROWS[5], ROWS[2]]
    rows = read_metrics(write(tmp_path / METRICS, shuffled, tail='{"kind": "train", "st'))  # torn last line
    assert len(rows) == 7
    assert train_losses(rows) == [2.9, 2.7, 2.5, 2.2]
    assert val_losses(rows) == [(0, 3.0), (2, 2.6), (4, 2.1)]
    assert read_metrics(tmp_path / "absent.jsonl") == []


def test_truncate_keeps_rows_up_to_the_resume_step(tmp_path):
    path = write(tmp_path / METRICS, ROWS, tail='{"kind": "train", "step": 5, "train_lo')
    truncate_metrics(path, 3)
    rows = read_metrics(path)
    assert train_losses(rows) == [2.9, 2.7, 2.5] and val_losses(rows) == [(0, 3.0), (2, 2.6)]
    assert path.read_text().endswith("\n") and len(path.read_text().splitlines()) == 5  # torn line dropped


def test_truncate_at_zero_drops_the_initial_evaluation_that_is_redone(tmp_path):
    path = write(tmp_path / METRICS, ROWS)
    truncate_metrics(path, 0)
    assert read_metrics(path) == []


def test_truncate_without_a_log_creates_nothing(tmp_path):
    truncate_metrics(tmp_path / METRICS, 4)
    assert not (tmp_path / METRICS).exists()


def test_truncate_at_an_evaluated_step_keeps_that_evaluation(tmp_path):
    """The callback evaluates before it checkpoints, and a resumed run does not evaluate its first step again."""
    path = write(tmp_path / METRICS, ROWS)
    truncate_metrics(path, 4)
    assert read_metrics(path) == ROWS
    truncate_metrics(path, 2)
    assert val_losses(read_metrics(path)) == [(0, 3.0), (2, 2.6)]
