"""The tier 3 release report: one JSON file per pipeline run, with its schema generated from these models.

The pydantic models are the single source of truth: `docs/report-schema.json` is `schema_text()` written
out (`python -m finetune.report docs/report-schema.json`), and a unit test keeps the two equal.
"""

from __future__ import annotations

import hashlib
import json
import sys
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from finetune.atomic import atomic_write_text

SCHEMA_VERSION = 1
SCHEMA_PATH = Path(__file__).resolve().parent.parent / "docs" / "report-schema.json"
REPORT_NAME = "report.json"

Status = Literal["passed", "failed", "skipped"]


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
    name: str
    status: Status
    reason: str | None = Field(None, description="why it failed or was skipped; None when it ran and passed")
    cached: bool = Field(False, description="skipped because its inputs digest matched an earlier run")
    seconds: float = Field(ge=0)
    digest: str | None = Field(
        None, description="sha256 of the stage's inputs (config sections + upstream digests)"
    )
    artifacts: list[Artifact] = Field(default_factory=list)
    details: dict[str, Any] = Field(default_factory=dict)


class GateReport(_Model):
    name: str
    status: Status
    measured: float | None = None
    threshold: float | None = None
    detail: str
    data: dict[str, Any] = Field(default_factory=dict)


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


class PipelineReport(_Model):
    schema_version: Literal[1] = SCHEMA_VERSION
    status: Literal["passed", "failed"]
    exit_code: int
    profile: str | None
    model: str
    run_dir: str
    started_at: str
    finished_at: str
    seconds: float = Field(ge=0)
    config: dict[str, Any]
    stages: list[StageReport]
    gates: list[GateReport]
    scores: list[RuntimeScore] = Field(default_factory=list)
    ollama: OllamaReport
    environment: dict[str, Any] = Field(description="finetune.doctor.collect(): versions, BLAS, CPU, memory")


def schema() -> dict[str, Any]:
    out = PipelineReport.model_json_schema()
    out["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    out["title"] = "FineTune tier 3 pipeline report"
    return out


def schema_text() -> str:
    return json.dumps(schema(), indent=2, sort_keys=True) + "\n"


def write_schema(path: str | Path = SCHEMA_PATH) -> Path:
    return atomic_write_text(path, schema_text())


def validate_report(data: dict[str, Any] | str) -> PipelineReport:
    """Parse a report (dict or JSON text); pydantic's ValidationError names the offending field."""
    if isinstance(data, str):
        return PipelineReport.model_validate_json(data)
    return PipelineReport.model_validate(data)


def write_report(report: PipelineReport, run_dir: str | Path) -> Path:
    return atomic_write_text(Path(run_dir) / REPORT_NAME, report.model_dump_json(indent=2) + "\n")


# ---------------------------------------------------------------- artifacts


def _file_sha256(path: Path) -> str:
    from finetune.models import file_sha256  # memoised by (path, size, mtime)

    return file_sha256(path)


def artifact(name: str, path: str | Path) -> Artifact:
    """Size and sha256 of a file, or of a folder's files (relative path + digest, sorted)."""
    path = Path(path)
    if path.is_file():
        return Artifact(
            name=name, path=str(path), kind="file", bytes=path.stat().st_size, sha256=_file_sha256(path)
        )
    if not path.is_dir():
        raise FileNotFoundError(f"artifact {name}: {path} does not exist")
    digest, total = hashlib.sha256(), 0
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        rel = file.relative_to(path).as_posix()
        digest.update(f"{rel}\0{_file_sha256(file)}\n".encode())
        total += file.stat().st_size
    return Artifact(name=name, path=str(path), kind="dir", bytes=total, sha256=digest.hexdigest())


def artifact_intact(a: Artifact | dict[str, Any]) -> bool:
    """Cheap re-check of a recorded artifact: it exists with the same kind and size."""
    a = a if isinstance(a, Artifact) else Artifact.model_validate(a)
    path = Path(a.path)
    if a.kind == "file":
        return path.is_file() and path.stat().st_size == a.bytes
    return path.is_dir() and sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) == a.bytes


if __name__ == "__main__":
    print(write_schema(sys.argv[1] if len(sys.argv) > 1 else SCHEMA_PATH))
