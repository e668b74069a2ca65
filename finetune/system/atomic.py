"""Atomic writes: a crash or Ctrl-C never leaves a half-written file or folder behind."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the usual file mode
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path


def atomic_write_text(path: str | Path, text: str) -> Path:
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> Path:
    return atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=str) + "\n")


@contextlib.contextmanager
def atomic_dir(final: str | Path) -> Iterator[Path]:
    """Yield a temp folder beside `final`; on success it replaces `final` in one rename."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=final.parent, prefix=f".{final.name}.", suffix=".tmp"))
    try:
        yield tmp
        os.chmod(tmp, 0o777 & ~_umask())
        if final.exists():
            old = final.with_name(f".{final.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


# What the writers above (and tempfile users that follow the same naming) leave behind if killed mid-write.
STALE_PATTERNS = (".*.tmp", ".*.tmp-*", ".*.old")


def remove_stale_temporaries(root: str | Path) -> list[tuple[Path, int]]:
    """Delete half-written files/folders a killed writer left under root; (path, bytes) of each.

    Call only while no writer can be running there (a run directory's lock is held)."""
    found = sorted(
        {p for pattern in STALE_PATTERNS for p in Path(root).rglob(pattern)}, key=lambda p: len(p.parts)
    )
    removed: list[tuple[Path, int]] = []
    for path in found:
        if any(path.is_relative_to(r) for r, _ in removed) or not (path.exists() or path.is_symlink()):
            continue
        files = [path] if not path.is_dir() else [f for f in path.rglob("*") if f.is_file()]
        size = sum(f.lstat().st_size for f in files if not f.is_symlink())
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
        removed.append((path, size))
    return removed
