"""Artifacts a stage wrote, identified by size and sha256 (a folder's digest covers its files' paths and digests)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.report.models import Artifact
from finetune.system.hashing import dir_sha256, file_sha256


def artifact(name: str, path: str | Path) -> Artifact:
    """Size and sha256 of a file, or of a folder's files (relative path + digest, sorted)."""
    path = Path(path)
    if path.is_file():
        return Artifact(
            name=name, path=str(path), kind="file", bytes=path.stat().st_size, sha256=file_sha256(path)
        )
    if not path.is_dir():
        raise FileNotFoundError(f"artifact {name}: {path} does not exist")
    digest, total = dir_sha256(path)
    return Artifact(name=name, path=str(path), kind="dir", bytes=total, sha256=digest)


def artifact_intact(a: Artifact | dict[str, Any]) -> bool:
    """Cheap re-check of a recorded artifact: it exists with the same kind and size."""
    a = a if isinstance(a, Artifact) else Artifact.model_validate(a)
    path = Path(a.path)
    if a.kind == "file":
        return path.is_file() and path.stat().st_size == a.bytes
    return path.is_dir() and sum(p.stat().st_size for p in path.rglob("*") if p.is_file()) == a.bytes
