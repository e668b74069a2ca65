"""What a verdict carries beyond its measurement: why its gate exists (the gate table) and which bytes it judged."""

from __future__ import annotations

from pathlib import Path

from finetune.gates.registry import GATES
from finetune.gates.verdict import Verdict
from finetune.system.hashing import path_identity


def explain(v: Verdict, judged_path: str | Path | None = None) -> Verdict:
    """Attach what the table knows to a verdict (its why) and, given it, the bytes it judged (path, sha256)."""
    if v.name in GATES:
        v.why = GATES[v.name].why
    if judged_path is not None:
        v.artifact = path_identity(judged_path)
    return v
