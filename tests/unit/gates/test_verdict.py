"""Verdicts: passed/failed/skipped (never silently passed), serializable, and naming the bytes they judged."""

from __future__ import annotations

import hashlib
import json

from finetune.gates.verdict import Verdict, judged, skipped, verdict


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


def test_to_dict_round_trips_through_json():
    v = verdict("fuse_exactness", False, 0.5, 1e-3, "dropped", {"worst": "model.layers.0.q_proj"})
    v.why, v.artifact = "a fuse that drops the adapter", {"path": "/x", "sha256": "ab"}
    back = Verdict.from_dict(json.loads(json.dumps(v.to_dict())))
    assert back == v and back.to_dict() == v.to_dict()


def test_from_dict_ignores_unknown_keys_and_defaults_missing_ones():
    v = Verdict.from_dict({"name": "g", "status": "passed", "measured": 1.0, "threshold": 1.0, "detail": "d",
                           "added_later": 5})  # fmt: skip
    assert v.name == "g" and v.why == "" and v.artifact is None and v.data == {}


def test_judged_identifies_a_file_a_folder_or_nothing(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF weights")
    assert judged(f) == {"path": str(f), "sha256": hashlib.sha256(b"GGUF weights").hexdigest()}
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapters.safetensors").write_bytes(b"one")
    first = judged(folder)
    assert first["path"] == str(folder) and len(first["sha256"]) == 64
    (folder / "adapters.safetensors").write_bytes(b"two")
    assert judged(folder)["sha256"] != first["sha256"]  # other bytes, other identity
    assert judged(tmp_path / "missing") is None
