"""The report schema: generated from the pydantic models, committed, and enforced on reports."""

from __future__ import annotations

import hashlib
import json

import pytest
from pydantic import ValidationError

from finetune import report as R


def healthy() -> dict:
    stage = {"name": "prepull", "status": "passed", "seconds": 0.1, "digest": "d" * 64,
             "artifacts": [{"name": "m", "path": "/x", "kind": "file", "bytes": 3, "sha256": "a" * 64}]}  # fmt: skip
    return {
        "status": "passed",
        "exit_code": 0,
        "profile": "release",
        "model": "smollm2-135m",
        "run_dir": "/tmp/run",
        "started_at": "2026-01-01T00:00:00+00:00",
        "finished_at": "2026-01-01T00:01:00+00:00",
        "seconds": 60.0,
        "config": {"model": {"name": "smollm2-135m"}},
        "stages": [stage],
        "gates": [
            {"name": "output_parity", "status": "passed", "measured": 1.0, "threshold": 0.9, "detail": "ok"}
        ],
        "scores": [
            {
                "runtime": "ollama",
                "train": {"n": 2, "exact": 1, "contains": 2, "score": 1.0},
                "heldout": {"n": 2, "exact": 0, "contains": 1, "score": 0.5},
            }
        ],  # fmt: skip
        "ollama": {
            "status": "passed",
            "deleted": True,
            "server_stopped": True,
            "served_checks": [{"name": "generate", "passed": True, "detail": "ok"}],
        },  # fmt: skip
        "environment": {"python": "3.11"},
    }


def test_committed_schema_is_what_the_code_generates():
    assert R.SCHEMA_PATH.is_file(), "run: python -m finetune.report docs/report-schema.json"
    assert R.SCHEMA_PATH.read_text() == R.schema_text(), "regenerate: python -m finetune.report"


def test_schema_is_json_schema_with_every_top_level_field():
    schema = json.loads(R.schema_text())
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert {"stages", "gates", "scores", "ollama", "environment", "status"} <= set(schema["required"]) | set(
        schema["properties"]
    )
    assert schema["additionalProperties"] is False


def test_a_healthy_report_validates_and_round_trips(tmp_path):
    rep = R.validate_report(healthy())
    path = R.write_report(rep, tmp_path)
    assert path == tmp_path / "report.json"
    assert R.validate_report(path.read_text()) == rep


@pytest.mark.parametrize(
    "breakage, field",
    [
        (lambda r: r["stages"][0].update(status="ok"), "status"),  # not passed/failed/skipped
        (lambda r: r.pop("environment"), "environment"),
        (lambda r: r["stages"][0]["artifacts"][0].update(sha256="xyz"), "sha256"),
        (lambda r: r["gates"][0].update(colour="red"), "colour"),  # unknown keys are refused
        (lambda r: r["scores"][0]["train"].update(score=1.5), "score"),
    ],
)
def test_a_broken_report_fails_validation_naming_the_field(breakage, field):
    data = healthy()
    breakage(data)
    with pytest.raises(ValidationError) as err:
        R.validate_report(data)
    assert field in str(err.value)


def test_artifact_of_a_file_and_a_folder(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    a = R.artifact("w", f)
    assert (a.kind, a.bytes, a.sha256) == ("file", 3, hashlib.sha256(b"abc").hexdigest())
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("1")
    (d / "sub" / "b.txt").write_text("22")
    first = R.artifact("d", d)
    assert (first.kind, first.bytes) == ("dir", 3)
    assert R.artifact_intact(first)
    (d / "sub" / "b.txt").write_text("33")  # same size, other content: a new digest
    assert R.artifact("d", d).sha256 != first.sha256


def test_artifact_intact_fails_when_a_file_changes_size_or_disappears(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    a = R.artifact("w", f)
    f.write_bytes(b"abcd")
    assert not R.artifact_intact(a)
    f.unlink()
    assert not R.artifact_intact(a.model_dump())
    with pytest.raises(FileNotFoundError, match="w.bin"):
        R.artifact("w", f)
