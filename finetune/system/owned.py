"""Folders FineTune may write into: one it created, or one holding its marker. Anything else is the user's.

A run dir's subfolder names (data/, checkpoints/, eval/, ...) are common in a user's project, and a run
rewrites and prunes them; so a folder that exists, is not empty and carries no marker is refused before a
byte is written. config.yaml alone is no proof: a user's project may well have one.
"""

from __future__ import annotations

import json
import os
from datetime import UTC, datetime
from pathlib import Path

from finetune.errors import UserError
from finetune.system.atomic import atomic_write_text

MARKER = ".finetune-run"


class NotOwned(UserError):
    """A folder that FineTune did not create and that holds someone else's files."""


def is_owned(folder: Path) -> bool:
    return (Path(folder) / MARKER).is_file()


def claim(folder: Path, *, flag: str = "--run-dir") -> Path:
    """Make `folder` FineTune's (create it, or mark an empty one); refuse a non-empty folder without the marker."""
    folder = Path(folder)
    if is_owned(folder):
        return folder
    if folder.exists() and not folder.is_dir():
        raise NotOwned(f"{flag} {folder}: a file, not a folder; give a new folder for FineTune to create")
    entries = sorted(p.name for p in folder.iterdir()) if folder.exists() else []
    if entries:
        shown = ", ".join(entries[:6]) + (f" and {len(entries) - 6} more" if len(entries) > 6 else "")
        raise NotOwned(
            f"{flag} {folder}: the folder exists, is not empty ({shown}) and was not created by FineTune "
            f"(no {MARKER}); nothing was written. FineTune writes only into a folder it created: give a "
            f"new path such as {folder / 'finetune-run'}. If it is a run of an older FineTune, "
            f"mark it yourself: touch {folder / MARKER}"
        )
    folder.mkdir(parents=True, exist_ok=True)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    atomic_write_text(folder / MARKER, json.dumps({"created": stamp, "pid": os.getpid()}) + "\n")
    return folder
