"""Where the suites' generated tables go: artifacts/docs/ (FT_DOCS_OUT), never the tracked docs/ directly.

Running a suite must not rewrite tracked files; `make docs` copies what the last runs wrote into docs/. A table
that merges rows across suites (the fault table) reads its store from the last run's output when there is one,
else from the published copy, so each suite still updates only its own rows.
"""

from __future__ import annotations

import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PUBLISHED = ROOT / "docs"


def out_dir() -> Path:
    return Path(os.environ.get("FT_DOCS_OUT") or ROOT / "artifacts" / "docs")


def output(name: str) -> Path:
    """Where a suite writes `name` (e.g. "reliability.md")."""
    return out_dir() / name


def latest(name: str) -> Path:
    """The newest copy of `name` to build on: this machine's last output, else the published one."""
    out = output(name)
    return out if out.exists() else PUBLISHED / name
