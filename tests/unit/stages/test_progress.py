"""Long stages say how long they have run and, from the history, how long they usually take."""

from __future__ import annotations

import time

from finetune.report import history
from finetune.stages.progress import describe, expected_seconds, heartbeat


def test_heartbeat_lines_while_the_block_runs():
    lines = []
    with heartbeat("gguf", lines.append, expected=10.0, every=0.05):
        time.sleep(0.3)
    n = len(lines)
    time.sleep(0.15)
    assert n >= 3 and len(lines) == n, "no line after the block ended"
    assert lines[0].startswith("[gguf] 0 s (usually ~10 s: ~10 s left)")


def test_eta_text():
    assert describe(12.4, None) == "12 s"
    assert describe(30, 45) == "30 s (usually ~45 s: ~15 s left)" and describe(50, 45).endswith("5 s over)")


def test_expected_seconds_are_medians_of_fresh_passed_stages_of_this_tier_and_model(tmp_path):
    path = tmp_path / "history.jsonl"
    for secs, cached in ((10, False), (30, False), (20, False), (999, True)):
        history.append({"command": "pipeline", "status": "passed", "model": "m",
                        "stages": {"gguf": {"status": "passed", "seconds": secs, "cached": cached}}}, path)  # fmt: skip
    history.append({"command": "run", "status": "passed", "model": "m", "stages": {"gguf": {"status": "passed",
                    "seconds": 500}}}, path)  # fmt: skip
    assert expected_seconds(history.load(path), "pipeline", "m") == {"gguf": 20}
    assert expected_seconds(history.load(path), "pipeline", "other") == {}
