"""Run a tier's stages in order with a digest cache, and write the run's report whatever happens.

Each stage records RUN/stages/<name>.json with the sha256 of its inputs (code version, injected faults, the
user's files by content and the tools' versions included: stage_keys) and its outputs, artifacts (with
each folder's per-file digests) and verdicts; a rerun skips a stage whose digest matches and whose artifacts
still hash to the recorded digests, so a failed or interrupted run continues where it stopped. An artifact
that changed under the run is named, and that stage and every later one run again. After a failed stage
the later ones are skipped ("<stage> failed").
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune import faults
from finetune.errors import UserError
from finetune.gates.verdict import Verdict
from finetune.report.artifacts import artifact_changes
from finetune.report.models import Artifact, StageReport
from finetune.system import signals
from finetune.system.atomic import atomic_write_json
from finetune.system.hashing import dir_manifest, json_sha256
from finetune.tiers import stage_keys
from finetune.tiers.context import Ctx, Stage, StageError, StageResult
from finetune.tiers.progress import heartbeat

STAGE_DIR = "stages"


def stage_digest(ctx: Ctx, stage: Stage) -> tuple[str, dict[str, Any]]:
    inputs = {
        **stage.inputs(ctx),
        **stage_keys.key_parts(ctx, stage.name),
        "code": stage_keys.code_version(),
        "faults": faults.injected_at(stage.name),
    }
    return json_sha256(inputs), inputs


def record_path(run_dir: Path, name: str) -> Path:
    return run_dir / STAGE_DIR / f"{name}.json"


def _cached(
    ctx: Ctx, name: str, digest: str, inputs: dict[str, Any]
) -> tuple[dict[str, Any] | None, str | None]:
    """(the stage's earlier record when it can be replayed, else None and why it runs again: None the first time)."""
    import json

    try:
        record = json.loads(record_path(ctx.run_dir, name).read_text())
    except (OSError, ValueError):
        return None, None
    if ctx.changed is not None:
        return None, f"rerunning: {ctx.changed}'s artifacts changed under the run"
    if record.get("digest") != digest:
        return None, "rerunning: " + "; ".join(stage_keys.input_changes(record.get("inputs", {}), inputs))
    files = record.get("files", {})
    changes = [c for a in record.get("artifacts", []) for c in artifact_changes(a, files.get(a.get("name")))]
    if changes:
        ctx.changed = name
        return None, f"{'; '.join(c.describe(ctx.run_dir) for c in changes)}: rerunning from {name}"
    return record, None


@dataclass
class StageOutcome:
    report: StageReport
    bad_input: bool = False


def run_stage(ctx: Ctx, stage: Stage) -> StageOutcome:
    """Replay the stage from its record when its inputs and artifacts are unchanged, else run it and record it."""
    name = stage.name
    try:
        digest, inputs = stage_digest(ctx, stage)
    except Exception as exc:
        reason = f"inputs: {type(exc).__name__}: {exc}"
        return StageOutcome(
            StageReport(name=name, status="failed", reason=reason, seconds=0, required=stage.required)
        )
    ctx.digests[name] = digest
    record, why = _cached(ctx, name, digest, inputs)
    if why:
        ctx.log(f"[{name}] {why}")
    if record is not None:
        return _replay(ctx, stage, record, digest)
    return _execute(ctx, stage, digest, inputs)


def _replay(ctx: Ctx, stage: Stage, record: dict[str, Any], digest: str) -> StageOutcome:
    name, artifacts = stage.name, record.get("artifacts", [])
    ctx.outputs[name] = record["outputs"]
    ctx.artifacts[name] = {a["name"]: a["sha256"] for a in artifacts}
    ctx.verdicts += [Verdict.from_dict(v) for v in record.get("verdicts", [])]
    ctx.log(f"[{name}] up to date (inputs {digest[:12]}): not rerun")
    report = StageReport(
        name=name,
        status="passed",
        reason=f"cached: inputs unchanged since {record.get('finished_at')}",
        cached=True,
        required=stage.required,
        seconds=0,
        digest=digest,
        artifacts=[Artifact.model_validate(a) for a in artifacts],
        details=record.get("details", {}),
    )
    return StageOutcome(report)


def _execute(ctx: Ctx, stage: Stage, digest: str, inputs: dict[str, Any]) -> StageOutcome:
    name, tic = stage.name, time.perf_counter()
    usual = ctx.expected.get(name)
    ctx.log(f"[{name}] ..." + (f" (usually ~{usual:.0f} s)" if usual else ""))
    record_path(ctx.run_dir, name).unlink(missing_ok=True)  # a half-finished stage must not look done
    beat = heartbeat(name, ctx.log, usual, ctx.heartbeat_s) if ctx.heartbeat_s else contextlib.nullcontext()
    try:
        with beat:
            result: StageResult = stage.run(ctx)
    except (signals.Interrupted, KeyboardInterrupt):
        raise
    except Exception as exc:
        seconds = round(time.perf_counter() - tic, 3)
        reason = str(exc) if isinstance(exc, StageError) else f"{type(exc).__name__}: {exc}"
        ctx.log(f"[{name}] FAILED after {seconds:.1f} s: {reason}")
        details = exc.details if isinstance(exc, StageError) else {}
        report = StageReport(
            name=name,
            status="failed",
            reason=reason,
            seconds=seconds,
            digest=digest,
            details=details,
            required=stage.required,
        )
        return StageOutcome(report, bad_input=isinstance(exc, UserError))
    seconds = round(time.perf_counter() - tic, 3)
    ctx.outputs[name] = result.outputs
    ctx.artifacts[name] = {a.name: a.sha256 for a in result.artifacts}
    ctx.verdicts += result.verdicts
    if result.status == "passed" and result.cache:
        _record(ctx, name, digest, inputs, result, seconds)
    for v in result.verdicts:
        ctx.log(f"  {v}")
    ctx.log(f"[{name}] {result.status} in {seconds:.1f} s" + (f": {result.reason}" if result.reason else ""))
    report = StageReport(
        name=name,
        status=result.status,
        reason=result.reason,
        seconds=seconds,
        digest=digest,
        artifacts=result.artifacts,
        details=result.details,
        required=stage.required,
    )
    return StageOutcome(report)


def _record(ctx: Ctx, name: str, digest: str, inputs: dict, result: StageResult, seconds: float) -> None:
    """What a later run replays: inputs digest, outputs, artifacts (with per-file digests), verdicts."""
    record = {
        "name": name,
        "digest": digest,
        "inputs": inputs,
        "outputs": result.outputs,
        "artifacts": [a.model_dump() for a in result.artifacts],
        "details": result.details,
        "files": {a.name: dir_manifest(a.path) for a in result.artifacts if a.kind == "dir"},
        "verdicts": [v.to_dict() for v in result.verdicts],
        "seconds": seconds,
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write_json(record_path(ctx.run_dir, name), record)


def run_stages(
    ctx: Ctx, stages: Sequence[Stage]
) -> tuple[list[StageReport], bool, signals.Interrupted | None]:
    """(stage reports, some stage failed on bad input, the signal that stopped the run if one did)."""
    reports: list[StageReport] = []
    bad_input, failed = False, None
    for stage in stages:
        if failed is not None:
            reports.append(_not_run(stage, f"{failed} failed"))
            continue
        try:
            outcome = run_stage(ctx, stage)
        except (signals.Interrupted, KeyboardInterrupt) as exc:
            stop = signals.as_interrupted(exc)
            done = {r.name for r in reports} | {stage.name}
            reports.append(_not_run(stage, f"interrupted by {stop.name}", status="failed"))
            reports += [_not_run(s, "interrupted") for s in stages if s.name not in done]
            return reports, bad_input, stop
        reports.append(outcome.report)
        bad_input = bad_input or outcome.bad_input
        if outcome.report.status == "failed":
            failed = stage.name
    return reports, bad_input, None


def _not_run(stage: Stage, reason: str, status: str = "skipped") -> StageReport:
    return StageReport(name=stage.name, status=status, reason=reason, seconds=0, required=stage.required)
