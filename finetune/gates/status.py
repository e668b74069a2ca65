"""What a run's status means: passed only when every required stage and gate ran and passed.

  passed       every required stage and gate ran and passed                       exit 0
  failed       a stage or gate failed                                              exit 1
  bad_input    the config, data or a model folder is wrong (message names it)     exit 2
  degraded     something required was skipped (the reasons say what and why)      exit 3
  interrupted  SIGINT / SIGTERM / SIGHUP stopped it (resumable)                   exit 130 / 143 / 129

Skips the user allowed explicitly (FT_ALLOW_SKIP=ollama,... or gates.skip) do not degrade a run; the
report records the allowance.
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from finetune.gates.verdict import Verdict

EXIT = {"passed": 0, "failed": 1, "bad_input": 2, "degraded": 3}
ALLOW_ENV = "FT_ALLOW_SKIP"


def allowed_skips(env: Mapping[str, str] | None = None, configured: Sequence[str] = ()) -> set[str]:
    """Stage or gate names whose skip the user allowed: FT_ALLOW_SKIP (comma-separated) and gates.skip."""
    raw = (os.environ if env is None else env).get(ALLOW_ENV, "")
    return {n.strip() for n in raw.split(",") if n.strip()} | set(configured)


@dataclass
class Outcome:
    status: str
    exit_code: int
    reasons: list[str] = field(default_factory=list)
    allowed: list[str] = field(default_factory=list)  # skips that were allowed, with their reasons


def decide(
    stages: Sequence[Mapping],
    verdicts: Sequence[Verdict],
    *,
    required_gates: Sequence[str],
    allowed: set[str],
    gate_stages: Mapping[str, str] | None = None,
    bad_input: bool = False,
    interrupted: int | None = None,
) -> Outcome:
    """stages: [{"name", "status", "reason", "required"}]; verdicts: every gate that was judged or skipped.

    gate_stages maps a gate to the stage that measures it: allowing that stage's skip allows the gate's too.
    """
    gate_stages = dict(gate_stages or {})
    if interrupted is not None:
        return Outcome("interrupted", 128 + interrupted, ["interrupted by a signal"])
    failed = [f"stage {s['name']} failed: {s.get('reason')}" for s in stages if s["status"] == "failed"]
    failed += [f"gate {v.name} failed: {v.detail}" for v in verdicts if v.status == "failed"]
    if bad_input:
        return Outcome("bad_input", EXIT["bad_input"], failed)
    by_name = {v.name: v for v in verdicts}
    skips: list[tuple[str, str]] = [
        (s["name"], f"stage {s['name']} skipped: {s.get('reason')}")
        for s in stages
        if s["status"] == "skipped" and s.get("required", True) and not s.get("cached")
    ]
    for name in required_gates:
        v = by_name.get(name)
        if v is None:
            skips.append((name, f"gate {name} was not judged"))
        elif v.status == "skipped":
            skips.append((name, f"gate {name} skipped: {v.detail}"))

    def ok(name: str) -> bool:
        return name in allowed or gate_stages.get(name) in allowed

    allowed_now = [why for name, why in skips if ok(name)]
    missing = [why for name, why in skips if not ok(name)]
    if failed:
        return Outcome("failed", EXIT["failed"], failed + missing, allowed_now)
    if missing:
        return Outcome("degraded", EXIT["degraded"], missing, allowed_now)
    return Outcome("passed", EXIT["passed"], [], allowed_now)
