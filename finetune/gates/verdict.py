"""A gate's verdict: passed, failed or skipped (never silently passed), with what was measured against what
threshold, why the gate exists, and which artifact on disk it judged (path + sha256)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

from finetune.system.hashing import dir_sha256, file_sha256

Status = Literal["passed", "failed", "skipped"]
MARK = {"passed": "PASS", "failed": "FAIL", "skipped": "SKIP"}


@dataclass
class Verdict:
    name: str
    status: Status
    measured: float | None
    threshold: float | None
    detail: str
    why: str = ""  # the fault this gate exists to catch
    artifact: dict[str, str] | None = None  # {"path", "sha256"} of what was judged
    data: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return self.status == "passed"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Verdict:
        return cls(**{k: d.get(k) for k in cls.__dataclass_fields__ if k in d})

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
    return Verdict(name, "passed" if ok else "failed", measured, threshold, detail, data=dict(data or {}))


def skipped(name: str, reason: str, threshold: float | None = None) -> Verdict:
    return Verdict(name, "skipped", None, threshold, reason)


def judged(path: str | Path) -> dict[str, str] | None:
    """Identify the artifact a gate read, so the report says exactly which bytes were judged."""
    path = Path(path)
    if path.is_file():
        return {"path": str(path), "sha256": file_sha256(path)}
    if path.is_dir():
        return {"path": str(path), "sha256": dir_sha256(path)[0]}
    return None
