"""Artifacts a stage wrote, identified by size and sha256 (a folder's digest covers its files' paths and digests).

A recorded artifact is intact only when its content hashes to the recorded digest: a same-sized file with
other bytes is a change, and a verdict is never replayed for bytes it did not judge.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.report.models import Artifact
from finetune.system.hashing import dir_manifest, dir_sha256, file_sha256, manifest_sha256


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


@dataclass(frozen=True)
class Change:
    """One file of a recorded artifact whose content is not the recorded one (None: absent then or now)."""

    path: Path
    recorded: str | None
    now: str | None

    def describe(self, root: Path | None = None) -> str:
        shown = (
            self.path.relative_to(root) if root is not None and self.path.is_relative_to(root) else self.path
        )
        if self.now is None:
            return f"{shown} is missing (recorded sha256 {_short(self.recorded)})"
        if self.recorded is None:
            return f"{shown} appeared since it was recorded (sha256 {_short(self.now)})"
        return f"{shown} changed since it was recorded (sha256 {_short(self.recorded)} → {_short(self.now)})"


def _short(sha: str | None) -> str:
    return f"{sha[:12]}…" if sha else "?"


def artifact_changes(a: Artifact | dict[str, Any], files: dict[str, str] | None = None) -> list[Change]:
    """What differs on disk from a recorded artifact, by content; [] when intact. `files` is the folder's
    recorded manifest {relative path: sha256}: with it the changed files are named, without it the folder."""
    a = a if isinstance(a, Artifact) else Artifact.model_validate(a)
    path = Path(a.path)
    if a.kind == "file":
        now = file_sha256(path) if path.is_file() else None
        return [] if now == a.sha256 else [Change(path, a.sha256, now)]
    if not path.is_dir():
        return [Change(path, a.sha256, None)]
    manifest = dir_manifest(path)
    if manifest_sha256(manifest) == a.sha256:
        return []
    if files is None or manifest_sha256(files) != a.sha256:  # no (trustworthy) manifest: name the folder
        return [Change(path, a.sha256, manifest_sha256(manifest))]
    changed = [rel for rel in sorted(files.keys() | manifest.keys()) if files.get(rel) != manifest.get(rel)]
    return [Change(path / rel, files.get(rel), manifest.get(rel)) for rel in changed]


def artifact_intact(a: Artifact | dict[str, Any]) -> bool:
    """A recorded artifact is still there with the same content (sha256), not merely the same size."""
    return not artifact_changes(a)
