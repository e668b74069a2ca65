"""A gate's verdict: passed, failed or skipped (never silently passed), with what was measured against what
threshold, why the gate exists, and which artifact on disk it judged (path + sha256)."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

Status = Literal["passed", "failed", "skipped"]
MARK = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP"}


class Verdict(BaseModel):
    """One gate's verdict, the same object from the judge to report.json and back from a stage record."""

    model_config = ConfigDict(extra="forbid")

    name: str
    status: Status
    measured: float | None = None
    threshold: float | None = None
    detail: str
    why: str = Field("", description="the fault this gate exists to catch")
    artifact: dict[str, str] | None = Field(None, description="path and sha256 of what was judged")
    data: dict[str, Any] = Field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def __str__(self) -> str:
        return f"[{MARK[self.status]}] {self.name}: {self.detail}"


def verdict(
    name: str,
    ok: bool,
    measured: float | None,
    threshold: float | None,
    detail: str,
    data: dict[str, Any] | None = None,
) -> Verdict:
    status = "passed" if ok else "failed"
    return Verdict(
        name=name, status=status, measured=measured, threshold=threshold, detail=detail, data=dict(data or {})
    )


def skipped(name: str, reason: str, threshold: float | None = None) -> Verdict:
    return Verdict(name=name, status="skipped", threshold=threshold, detail=reason)
