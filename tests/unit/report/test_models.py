"""finetune.report.models: the report schema, generated from the pydantic models, committed, and enforced."""

import json

import pytest
from pydantic import ValidationError

from finetune.report import models as R


def test_committed_schema_is_what_the_code_generates():
    assert R.SCHEMA_PATH.is_file(), "run: python -m finetune.report.models docs/report-schema.json"
    assert R.SCHEMA_PATH.read_text() == R.schema_text(), (
        "docs/report-schema.json is stale: run `python -m finetune.report.models docs/report-schema.json`"
    )


def test_schema_is_json_schema_with_every_top_level_field():
    schema = json.loads(R.schema_text())
    assert schema["$schema"].startswith("https://json-schema.org/")
    assert schema["title"] == "FineTune run report"
    assert {"command", "status", "code_version", "stages", "gates", "environment"} <= set(schema["required"])
    assert {"scores", "ollama", "reasons", "allowed_skips", "faults", "resume_command"} <= set(
        schema["properties"]
    )
    assert schema["additionalProperties"] is False
    assert schema["properties"]["schema_version"]["const"] == R.SCHEMA_VERSION


def test_write_schema(tmp_path):
    path = R.write_schema(tmp_path / "schema.json")
    assert path.read_text() == R.schema_text() and R.schema_text().endswith("}\n")


def test_a_healthy_report_validates_and_round_trips(tmp_path, healthy):
    rep = R.validate_report(healthy)
    assert rep.schema_version == 3 and rep.reasons == [] and rep.faults == [] and rep.resume_command is None
    path = R.write_report(rep, tmp_path)
    assert path == tmp_path / R.REPORT_NAME == tmp_path / "report.json"
    assert R.validate_report(path.read_text()) == rep == R.read_report(tmp_path)


@pytest.mark.parametrize(
    "status",
    ["passed", "failed", "degraded", "bad_input", "interrupted", "not_judged", "fault_injected", "running"],
)
def test_every_run_status_is_accepted(healthy, status):
    assert R.validate_report({**healthy, "status": status}).status == status


def test_a_report_without_ollama_or_scores_is_valid(healthy):
    del healthy["ollama"], healthy["scores"]
    rep = R.validate_report({**healthy, "command": "train"})
    assert rep.ollama is None and rep.scores == []


@pytest.mark.parametrize(
    "breakage, field",
    [
        (lambda r: r["stages"][0].update(status="ok"), "status"),  # not passed/failed/skipped
        (lambda r: r.pop("environment"), "environment"),
        (lambda r: r.pop("code_version"), "code_version"),
        (lambda r: r.update(command="release"), "command"),
        (lambda r: r.update(status="partly"), "status"),
        (lambda r: r.update(schema_version=1), "schema_version"),
        (lambda r: r["stages"][0]["artifacts"][0].update(sha256="xyz"), "sha256"),
        (lambda r: r["stages"][0]["artifacts"][0].update(bytes=-1), "bytes"),
        (lambda r: r["stages"][0].update(seconds=-0.5), "seconds"),
        (lambda r: r["gates"][0].update(colour="red"), "colour"),  # unknown keys are refused
        (lambda r: r["scores"][0]["train"].update(score=1.5), "score"),
        (lambda r: r["ollama"].update(status="maybe"), "status"),
    ],
)
def test_a_broken_report_fails_validation_naming_the_field(healthy, breakage, field):
    breakage(healthy)
    with pytest.raises(ValidationError) as err:
        R.validate_report(healthy)
    assert field in str(err.value)


def test_bad_json_text_is_a_validation_error(tmp_path):
    with pytest.raises(ValidationError):
        R.validate_report('{"command": "run",')
    with pytest.raises(FileNotFoundError):
        R.read_report(tmp_path)
