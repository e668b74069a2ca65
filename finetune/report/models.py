"""The run report: one report.json per run of any command, with its schema generated from these models.

The pydantic models are the single source of truth: `docs/report-schema.json` is `schema_text()` written
out (`python -m finetune.report.models docs/report-schema.json`), and a unit test keeps the two equal.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from finetune.gates.verdict import Verdict
from finetune.system.atomic import atomic_write_text

SCHEMA_VERSION = 3
SCHEMA_PATH = Path(__file__).resolve().parents[2] / "docs" / "report-schema.json"
REPORT_NAME = "report.json"

Status = Literal["passed", "failed", "skipped"]
RunStatus = Literal[
    "passed", "failed", "degraded", "bad_input", "interrupted", "not_judged", "fault_injected", "running"
]


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Artifact(_Model):
    """A file or folder a stage wrote; a folder's sha256 covers its files' relative paths and digests."""

    name: str
    path: str
    kind: Literal["file", "dir"]
    bytes: int = Field(ge=0)
    sha256: str = Field(pattern=r"^[0-9a-f]{64}$")


class StageReport(_Model):
    """A stage's outcome, one object end to end: the stage returns it (status, reason, outputs, artifacts,
    details, verdicts), the runner completes it (name, seconds, digest, required, cached) and records it for
    replay; report.json shows it without `outputs`, `verdicts` (under `gates`) and `record`."""

    name: str = ""
    status: Status = "passed"
    reason: str | None = Field(None, description="why it failed or was skipped; None when it ran and passed")
    cached: bool = Field(False, description="not rerun: its inputs digest (code version included) matched")
    required: bool = Field(True, description="a skip of a required stage degrades the run unless allowed")
    seconds: float = Field(0, ge=0)
    digest: str | None = Field(
        None, description="sha256 of the stage's inputs: config, upstream digests, code"
    )
    artifacts: list[Artifact] = Field(default_factory=list)
    details: dict[str, Any] = Field(default_factory=dict)
    outputs: dict[str, Any] = Field(default_factory=dict, exclude=True)  # what later stages read
    verdicts: list[Verdict] = Field(default_factory=list, exclude=True)
    # False: decide again next run (a skip for lack of a runtime may not hold next time)
    record: bool = Field(True, exclude=True)


class CheckReport(_Model):
    name: str
    passed: bool
    detail: str


class SplitScore(_Model):
    n: int = Field(ge=0)
    exact: int = Field(ge=0)
    contains: int = Field(ge=0, description="answers containing the reference, exact ones included")
    score: float = Field(ge=0, le=1, description="share of answers that contain the reference")


class RuntimeScore(_Model):
    runtime: str
    train: SplitScore
    heldout: SplitScore


class OllamaReport(_Model):
    status: Status
    reason: str | None = None
    binary: str | None = None
    version: str | None = None
    model: str | None = None
    modelfile: str | None = None
    deploy_checks: list[CheckReport] = Field(default_factory=list)
    served_checks: list[CheckReport] = Field(default_factory=list)
    deleted: bool | None = Field(None, description="the model was deleted from the server at the end")
    server_stopped: bool | None = None


class RunReport(_Model):
    schema_version: Literal[3] = SCHEMA_VERSION
    command: Literal["run", "train", "pipeline", "validate"] = Field(
        description="the finetune command that ran"
    )
    status: RunStatus
    exit_code: int
    reasons: list[str] = Field(default_factory=list, description="why the status is not passed")
    allowed_skips: list[str] = Field(default_factory=list, description="skips the user allowed, with reasons")
    faults: list[str] = Field(default_factory=list, description="faults injected with FT_INJECT_FAULT")
    resume_command: str | None = Field(
        None, description="the exact command that continues an interrupted run"
    )
    profile: str | None
    model: str
    model_license: str | None = Field(
        None, description="terms the base model ships with (gemma3-270m: the Gemma Terms of Use)"
    )
    run_dir: str
    code_version: str = Field(description="finetune version + sha256 of its source")
    started_at: str
    finished_at: str
    seconds: float = Field(ge=0)
    config: dict[str, Any]
    stages: list[StageReport]
    gates: list[Verdict]
    scores: list[RuntimeScore] = Field(default_factory=list)
    ollama: OllamaReport | None = None
    environment: dict[str, Any] = Field(
        description="finetune.system.doctor.collect(): versions, BLAS, CPU, memory"
    )


def schema() -> dict[str, Any]:
    out = RunReport.model_json_schema()
    out["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    out["title"] = "FineTune run report"
    return out


def schema_text() -> str:
    return json.dumps(schema(), indent=2, sort_keys=True) + "\n"


def write_schema(path: str | Path = SCHEMA_PATH) -> Path:
    return atomic_write_text(path, schema_text())


def validate_report(data: dict[str, Any] | str) -> RunReport:
    """Parse a report (dict or JSON text); pydantic's ValidationError names the offending field."""
    if isinstance(data, str):
        return RunReport.model_validate_json(data)
    return RunReport.model_validate(data)


def read_report(run_dir: str | Path) -> RunReport:
    return validate_report((Path(run_dir) / REPORT_NAME).read_text())


def write_report(report: RunReport, run_dir: str | Path) -> Path:
    return atomic_write_text(Path(run_dir) / REPORT_NAME, report.model_dump_json(indent=2) + "\n")


if __name__ == "__main__":
    print(write_schema(sys.argv[1] if len(sys.argv) > 1 else SCHEMA_PATH))
