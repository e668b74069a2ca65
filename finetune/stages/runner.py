"""Run a command's stages in order with a digest cache.

Each stage records RUN/stages/<name>.json with the sha256 of its inputs (code version, injected faults, the
user's files by content and the tools' versions included: finetune.stages.keys) and its outputs, artifacts (with
each folder's per-file digests) and verdicts; a rerun skips a stage whose digest matches and whose artifacts
still hash to the recorded digests, so a failed or interrupted run continues where it stopped. An artifact
that changed under the run is named, and that stage and every later one run again. After a failed stage
the later ones are skipped ("<stage> failed").
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune import faults
from finetune.errors import UserError
from finetune.report.artifacts import artifact_changes
from finetune.report.models import StageReport
from finetune.stages import keys
from finetune.stages.context import Ctx, Stage, StageError
from finetune.stages.progress import heartbeat
from finetune.system import signals
from finetune.system.atomic import atomic_write_json
from finetune.system.hashing import dir_manifest, json_sha256

STAGE_DIR = "stages"


def stage_digest(ctx: Ctx, stage: Stage) -> tuple[str, dict[str, Any]]:
    inputs = {
        **stage.inputs(ctx),
        **keys.key_parts(ctx, stage.name),
        "code": keys.code_version(),
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
        return None, "rerunning: " + "; ".join(keys.input_changes(record.get("inputs", {}), inputs))
    files = record.get("files", {})
    changes = [c for a in record.get("artifacts", []) for c in artifact_changes(a, files.get(a.get("name")))]
    if changes:
        ctx.changed = name
        return None, f"{'; '.join(c.describe(ctx.run_dir) for c in changes)}: rerunning from {name}"
    return record, None


class Run:
    """A command's stages, run one after another in one run directory.

    `stage()` replays a stage from its record when its inputs and artifacts are unchanged, else runs and
    records it. After a failed stage the later ones are not run ("<stage> failed"); after a signal, neither
    ("interrupted"), and `stop` holds the signal for the report and the resume command.
    """

    def __init__(self, ctx: Ctx):
        self.ctx = ctx
        self.reports: list[StageReport] = []
        self.bad_input = False  # some stage failed on the user's input (exit 2)
        self.failed: str | None = None
        self.stop: signals.Interrupted | None = None

    def stage(self, stage: Stage) -> StageReport:
        ctx = self.ctx
        if self.stop is not None or self.failed is not None:
            return self._add(_not_run(stage, "interrupted" if self.stop else f"{self.failed} failed"))
        tic = time.perf_counter()
        try:
            report, digest, inputs = _replayed(ctx, stage)
            if report is None:
                with _announced(ctx, stage.name):
                    result = stage.run(ctx)
                report = _finished(ctx, stage, result, digest, inputs, tic)
        except (signals.Interrupted, KeyboardInterrupt) as exc:
            self.stop = signals.as_interrupted(exc)
            return self._add(_not_run(stage, f"interrupted by {self.stop.name}", status="failed"))
        except Exception as exc:
            self.bad_input = self.bad_input or isinstance(exc, UserError)
            report = _failed(ctx, stage, exc, ctx.digests.get(stage.name), tic)
        return self._add(report)

    def _add(self, report: StageReport) -> StageReport:
        self.reports.append(report)
        if report.status == "failed" and self.failed is None and self.stop is None:
            self.failed = report.name
        return report


def _replayed(ctx: Ctx, stage: Stage) -> tuple[StageReport | None, str, dict[str, Any]]:
    """(the stage's report when its record can be replayed, else None; its inputs digest; its inputs)."""
    name = stage.name
    try:
        digest, inputs = stage_digest(ctx, stage)
    except Exception as exc:
        raise StageError(f"inputs: {type(exc).__name__}: {exc}") from exc
    ctx.digests[name] = digest
    record, why = _cached(ctx, name, digest, inputs)
    if why:
        ctx.log(f"[{name}] {why}")
    if record is None:
        return None, digest, inputs
    kept = StageReport.model_validate({k: v for k, v in record.items() if k in StageReport.model_fields})
    ctx.outputs[name] = kept.outputs
    ctx.artifacts[name] = {a.name: a.sha256 for a in kept.artifacts}
    ctx.verdicts += kept.verdicts
    ctx.log(f"[{name}] up to date (inputs {digest[:12]}): not rerun")
    reason = f"cached: inputs unchanged since {record.get('finished_at')}"
    update = {"reason": reason, "cached": True, "required": stage.required, "seconds": 0, "digest": digest}
    report = kept.model_copy(update=update)
    return report, digest, inputs


@contextlib.contextmanager
def _announced(ctx: Ctx, name: str) -> Iterator[None]:
    """ "[name] ..." with its usual time, a heartbeat while it runs, and no record of it until it ends."""
    usual = ctx.expected.get(name)
    ctx.log(f"[{name}] ..." + (f" (usually ~{usual:.0f} s)" if usual else ""))
    record_path(ctx.run_dir, name).unlink(missing_ok=True)  # a half-finished stage must not look done
    with heartbeat(name, ctx.log, usual, ctx.heartbeat_s) if ctx.heartbeat_s else contextlib.nullcontext():
        yield


def _failed(ctx: Ctx, stage: Stage, exc: Exception, digest: str | None, tic: float) -> StageReport:
    seconds = round(time.perf_counter() - tic, 3)
    reason = str(exc) if isinstance(exc, StageError) else f"{type(exc).__name__}: {exc}"
    ctx.log(f"[{stage.name}] FAILED after {seconds:.1f} s: {reason}")
    details = exc.details if isinstance(exc, StageError) else {}
    return StageReport(
        name=stage.name,
        status="failed",
        reason=reason,
        seconds=seconds,
        digest=digest,
        details=details,
        required=stage.required,
    )


def _finished(
    ctx: Ctx, stage: Stage, report: StageReport, digest: str, inputs: dict[str, Any], tic: float
) -> StageReport:
    name, seconds = stage.name, round(time.perf_counter() - tic, 3)
    report = report.model_copy(
        update={"name": name, "seconds": seconds, "digest": digest, "required": stage.required}
    )
    ctx.outputs[name] = report.outputs
    ctx.artifacts[name] = {a.name: a.sha256 for a in report.artifacts}
    ctx.verdicts += report.verdicts
    if report.status == "passed" and report.record:
        _record(ctx, report, inputs)
    for v in report.verdicts:
        ctx.log(f"  {v}")
    ctx.log(f"[{name}] {report.status} in {seconds:.1f} s" + (f": {report.reason}" if report.reason else ""))
    return report


def _record(ctx: Ctx, report: StageReport, inputs: dict[str, Any]) -> None:
    """What a later run replays: the stage's report with its outputs and verdicts, its inputs, and each
    artifact folder's per-file digests."""
    record = {
        **report.model_dump(),
        "outputs": report.outputs,
        "verdicts": [v.model_dump() for v in report.verdicts],
        "inputs": inputs,
        "files": {a.name: dir_manifest(a.path) for a in report.artifacts if a.kind == "dir"},
        "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
    }
    atomic_write_json(record_path(ctx.run_dir, report.name), record)


def _not_run(stage: Stage, reason: str, status: str = "skipped") -> StageReport:
    return StageReport(name=stage.name, status=status, reason=reason, seconds=0, required=stage.required)
