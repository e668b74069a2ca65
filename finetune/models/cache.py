"""The model cache: $FT_CACHE_DIR (default ~/.cache/finetune)/models, folders built once and renamed into place.

A build fills a temp folder under a lock; the marker file is written last, so a folder without it is
incomplete (a killed build) and is rebuilt. Concurrent runs build once and never see half a folder.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from finetune.errors import UserError
from finetune.system.atomic import atomic_dir
from finetune.system.lock import LockTimeout, waiting_lock

MARKER = "finetune_model.json"
BUILD_VERSION = 2  # bump when a builder's output changes, so cached folders are rebuilt (2: digit split)
LOCK_TIMEOUT_S = 900.0
Log = Callable[[str], None]


class ModelUnavailable(UserError):
    """The model cannot be provided here; str(exc) is a human reason (used to skip a tier)."""


def stderr_log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def cache_root(cache_dir: Path | None = None, env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(env.get("FT_CACHE_DIR") or Path.home() / ".cache" / "finetune")


def is_built(target: Path) -> bool:
    return (target / MARKER).is_file()


def build_once(target: Path, build: Callable[[Path], dict], log: Log = stderr_log) -> Path:
    """Return target, building it first if needed: build(tmp_dir) fills a temp dir that is renamed into place."""
    if is_built(target):
        return target
    try:
        with waiting_lock(target.parent / ".locks" / f"{target.name}.lock", LOCK_TIMEOUT_S):
            if is_built(target):  # another process finished it while we waited
                return target
            if target.exists():
                log(f"removing incomplete model folder {target}")
                shutil.rmtree(target)
            # left by a killed build (atomic_dir's names, and this module's before it used atomic_dir)
            for pattern in (f".{target.name}.*.tmp", f".{target.name}.tmp-*"):
                for stale in target.parent.glob(pattern):
                    shutil.rmtree(stale, ignore_errors=True)
            start = time.perf_counter()
            with atomic_dir(target) as tmp:
                info = build(tmp)
                info["build_seconds"] = round(time.perf_counter() - start, 2)
                (tmp / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
                # safetensors and tempfile make owner-only files; the cache is shared
                for item in tmp.rglob("*"):
                    item.chmod(0o755 if item.is_dir() else 0o644)
    except LockTimeout as exc:
        raise ModelUnavailable(str(exc)) from None
    return target
