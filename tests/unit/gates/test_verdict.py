"""Verdicts: passed/failed/skipped (never silently passed), serializable, and naming the bytes they judged."""

from __future__ import annotations

import json

import pytest

from finetune.gates.verdict import Verdict, skipped, verdict


def test_verdict_maps_ok_to_passed_or_failed_and_keeps_measurements():
    ok = verdict("loss_convergence", True, 0.7, 0.95, "fell", {"initial": 3.0})
    bad = verdict("loss_convergence", False, 1.0, 0.95, "flat")
    assert (ok.status, ok.passed, ok.measured, ok.threshold, ok.data) == (
        "passed",
        True,
        0.7,
        0.95,
        {"initial": 3.0},
    )
    assert (bad.status, bad.passed, bad.data) == ("failed", False, {})


def test_verdict_copies_its_data():
    data = {"problems": ["a"]}
    v = verdict("label_mask", False, 0.0, 1.0, "x", data)
    data["problems"].append("b")
    data["other"] = 1
    assert "other" not in v.data


def test_skipped_is_neither_passed_nor_failed():
    v = skipped("gguf_tokenizer", "llama.cpp unavailable: no xllamacpp", threshold=1.0)
    assert v.status == "skipped" and not v.passed
    assert v.measured is None and v.threshold == 1.0 and v.detail == "llama.cpp unavailable: no xllamacpp"


def test_str_shows_the_mark_name_and_detail():
    assert str(verdict("g", True, 1, 1, "fine")) == "[PASS] g: fine"
    assert str(verdict("g", False, 1, 1, "broken")) == "[FAIL] g: broken"
    assert str(skipped("g", "no runtime")) == "[SKIP] g: no runtime"


def test_a_verdict_round_trips_through_json():
    v = verdict("fuse_exactness", False, 0.5, 1e-3, "dropped", {"worst": "model.layers.0.q_proj"})
    v.why, v.artifact = "a fuse that drops the adapter", {"path": "/x", "sha256": "ab"}
    back = Verdict.model_validate(json.loads(v.model_dump_json()))
    assert back == v and back.model_dump() == v.model_dump()


def test_missing_optional_keys_default_and_unknown_ones_are_refused():
    v = Verdict.model_validate({"name": "g", "status": "passed", "detail": "d"})
    assert v.measured is None and v.why == "" and v.artifact is None and v.data == {}
    with pytest.raises(ValueError, match="added_later"):
        Verdict.model_validate({"name": "g", "status": "passed", "detail": "d", "added_later": 5})
