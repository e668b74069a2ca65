"""`finetune pipeline`: HF model -> dataset -> LoRA (the `finetune train` CLI) -> fuse -> GGUF -> Ollama ->
evaluation -> run_dir/report.json.

Stages run in order (finetune.pipeline_stages). Each records run_dir/stages/<name>.json with the sha256 of
its inputs (config sections + upstream digests) and its outputs; a later run skips a stage whose digest
matches and whose artifacts are intact, so a failed run restarts where it broke. A failed stage marks every
later stage "skipped: <stage> failed". Every process started (Ollama, llama.cpp children, the trainer) is
stopped on success, failure and Ctrl-C.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from finetune.atomic import atomic_write_json
from finetune.config import ConfigError, RunConfig, load_config
from finetune.evaluate import EvalSettings
from finetune.pipeline_deps import Ctx, OllamaSession, PipelineDeps, StageError, StageResult, real_deps
from finetune.pipeline_stages import STAGES, stage_inputs
from finetune.report import (
    Artifact,
    CheckReport,
    GateReport,
    OllamaReport,
    PipelineReport,
    RuntimeScore,
    StageReport,
    artifact_intact,
    write_report,
)

__all__ = ["GATES", "PipelineDeps", "PipelineResult", "pipeline_main", "real_deps", "run_pipeline"]
GATES = ("output_parity", "adapter_effect", "clean_endings", "tokenizer_parity", "logprob_parity")
STAGE_DIR = "stages"
Log = Callable[[str], None]


def _bad_input_errors() -> tuple[type[BaseException], ...]:
    from finetune.data import DatasetError
    from finetune.modelfile import ModelfileError
    from finetune.templates import TemplateError

    return (ConfigError, DatasetError, TemplateError, ModelfileError)


@dataclass
class PipelineResult:
    report: PipelineReport
    report_path: Path
    exit_code: int  # 0 every stage and gate passed, 1 something failed, 2 bad input

    @property
    def passed(self) -> bool:
        return self.exit_code == 0


def digest_of(inputs: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(inputs, sort_keys=True, default=str).encode()).hexdigest()


def _record_path(run_dir: Path, name: str) -> Path:
    return run_dir / STAGE_DIR / f"{name}.json"


def _cached(run_dir: Path, name: str, digest: str) -> dict[str, Any] | None:
    """The stage's earlier record, if its inputs digest matches and its artifacts are still there."""
    path = _record_path(run_dir, name)
    try:
        record = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if record.get("digest") != digest or not all(artifact_intact(a) for a in record.get("artifacts", [])):
        return None
    return record


def run_pipeline(
    cfg: RunConfig,
    run_dir: str | Path,
    *,
    deps: PipelineDeps | None = None,
    log: Log = print,
    settings: EvalSettings | None = None,
) -> PipelineResult:
    """Run every stage, write run_dir/report.json (also on failure or Ctrl-C) and return it."""
    deps = deps or real_deps()
    run_dir = Path(run_dir).absolute()
    run_dir.mkdir(parents=True, exist_ok=True)
    started, tic = datetime.now(UTC), time.perf_counter()
    stages: list[StageReport] = []
    bad_input = interrupted = False
    with contextlib.ExitStack() as stack:
        session = OllamaSession(deps, run_dir / "ollama", stack)
        ctx = Ctx(cfg, run_dir, deps, log, settings or EvalSettings(), session)
        failed: str | None = None
        try:
            for name, fn in STAGES:
                if failed is not None:
                    stages.append(
                        StageReport(name=name, status="skipped", reason=f"{failed} failed", seconds=0)
                    )
                    continue
                report, ok, bad = _run_stage(ctx, name, fn)
                stages.append(report)
                bad_input = bad_input or bad
                if not ok:
                    failed = name
        except KeyboardInterrupt:
            interrupted = True
            done = {s.name for s in stages}
            stages += [
                StageReport(name=n, status="skipped", reason="interrupted", seconds=0)
                for n, _ in STAGES
                if n not in done
            ]
        finally:
            session.delete_models()
    # The ExitStack has stopped the server (also on Ctrl-C): its cleanup record is complete now.
    result = _finish(ctx, stages, started, tic, bad_input, interrupted=interrupted)
    if interrupted:
        raise KeyboardInterrupt
    return result


def _run_stage(ctx: Ctx, name: str, fn: Callable[[Ctx], StageResult]) -> tuple[StageReport, bool, bool]:
    """(report entry, ok, failed on bad input)."""
    tic = time.perf_counter()
    try:
        digest = digest_of(stage_inputs(name, ctx))
    except Exception as exc:
        return (
            StageReport(name=name, status="failed", reason=f"inputs: {type(exc).__name__}: {exc}", seconds=0),
            False,
            False,
        )
    ctx.digests[name] = digest
    record = _cached(ctx.run_dir, name, digest)
    if record is not None:
        ctx.outputs[name] = record["outputs"]
        ctx.artifacts[name] = {a["name"]: a["sha256"] for a in record.get("artifacts", [])}
        ctx.log(f"[{name}] up to date (inputs {digest[:12]}): skipped")
        arts = [Artifact.model_validate(a) for a in record.get("artifacts", [])]
        return (
            StageReport(name=name, status="skipped", reason=f"cached: inputs unchanged since {record.get('finished_at')}",
                        cached=True, seconds=0, digest=digest, artifacts=arts, details=record.get("details", {})),
            True,
            False,
        )  # fmt: skip
    ctx.log(f"[{name}] ...")
    _record_path(ctx.run_dir, name).unlink(missing_ok=True)  # a half-finished stage must not look done
    try:
        result = fn(ctx)
    except KeyboardInterrupt:
        raise
    except Exception as exc:
        seconds = round(time.perf_counter() - tic, 3)
        details = exc.details if isinstance(exc, StageError) else {}
        reason = str(exc) if isinstance(exc, StageError) else f"{type(exc).__name__}: {exc}"
        ctx.log(f"[{name}] FAILED after {seconds:.1f} s: {reason}")
        bad = isinstance(exc, _bad_input_errors())
        return (
            StageReport(
                name=name, status="failed", reason=reason, seconds=seconds, digest=digest, details=details
            ),
            False,
            bad,
        )
    seconds = round(time.perf_counter() - tic, 3)
    ctx.outputs[name] = result.outputs
    ctx.artifacts[name] = {a.name: a.sha256 for a in result.artifacts}
    if result.status == "passed" and result.cache:
        finished = datetime.now(UTC).isoformat(timespec="seconds")
        atomic_write_json(
            _record_path(ctx.run_dir, name),
            {"name": name, "digest": digest, "inputs": stage_inputs(name, ctx), "outputs": result.outputs,
             "artifacts": [a.model_dump() for a in result.artifacts], "details": result.details,
             "seconds": seconds, "finished_at": finished},
        )  # fmt: skip
    ctx.log(f"[{name}] {result.status} in {seconds:.1f} s" + (f": {result.reason}" if result.reason else ""))
    report = StageReport(name=name, status=result.status, reason=result.reason, seconds=seconds, digest=digest,
                         artifacts=result.artifacts, details=result.details)  # fmt: skip
    return report, True, False


# ---------------------------------------------------------------- report


def _evaluation(stages: Sequence[StageReport], ctx: Ctx) -> dict[str, Any] | None:
    if "evaluate" in ctx.outputs:
        return ctx.outputs["evaluate"].get("evaluation")
    entry = next((s for s in stages if s.name == "evaluate"), None)
    return entry.details.get("evaluation") if entry is not None else None


def _gates(stages: Sequence[StageReport], evaluation: dict[str, Any] | None) -> list[GateReport]:
    entry = next((s for s in stages if s.name == "evaluate"), None)
    if evaluation is None:
        why = entry.reason if entry is not None and entry.reason else "evaluation did not run"
        return [GateReport(name=g, status="skipped", detail=f"not evaluated: {why}") for g in GATES]
    gates = [
        GateReport(name=v["name"], status="passed" if v["passed"] else "failed", measured=v["measured"],
                   threshold=v["threshold"], detail=v["detail"], data=v.get("data") or {})
        for v in evaluation["verdicts"]
    ]  # fmt: skip
    gates += [
        GateReport(name=g, status="skipped", detail=why)
        for g, why in evaluation.get("skipped_gates", {}).items()
    ]
    return gates


def _ollama_report(stages: Sequence[StageReport], ctx: Ctx) -> OllamaReport:
    entry = next((s for s in stages if s.name == "ollama"), None)
    if entry is None:
        return OllamaReport(status="skipped", reason="not reached")
    d = entry.details
    checks = {k: [CheckReport(**c) for c in d.get(k, [])] for k in ("deploy_checks", "served_checks")}
    cleanup = ctx.session.cleanup_result
    model = d.get("model")
    deleted = cleanup.get(model, {}).get("deleted") if model in cleanup else None
    return OllamaReport(
        status=entry.status, reason=entry.reason, binary=d.get("binary"), version=d.get("version"), model=model,
        modelfile=d.get("modelfile"), deleted=deleted, server_stopped=cleanup.get("server_stopped"), **checks,
    )  # fmt: skip


def _finish(ctx: Ctx, stages: list[StageReport], started: datetime, tic: float, bad_input: bool,
            *, interrupted: bool = False) -> PipelineResult:  # fmt: skip
    evaluation = _evaluation(stages, ctx)
    gates = _gates(stages, evaluation)
    failed = (
        interrupted or any(s.status == "failed" for s in stages) or any(g.status == "failed" for g in gates)
    )
    failed = failed or not any(g.status == "passed" for g in gates)
    code = 2 if bad_input else 1 if failed else 0
    try:
        env = ctx.deps.collect_env()
    except Exception as exc:  # the report must still be written
        env = {"error": f"{type(exc).__name__}: {exc}"}
    report = PipelineReport(
        status="failed" if failed else "passed",
        exit_code=130 if interrupted else code,
        profile=ctx.cfg.profile,
        model=ctx.cfg.model.name,
        run_dir=str(ctx.run_dir),
        started_at=started.isoformat(timespec="seconds"),
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        seconds=round(time.perf_counter() - tic, 3),
        config=ctx.cfg.to_dict(),
        stages=stages,
        gates=gates,
        scores=[RuntimeScore(**s) for s in (evaluation or {}).get("scores", [])],
        ollama=_ollama_report(stages, ctx),
        environment=json.loads(json.dumps(env, default=str)),
    )
    return PipelineResult(report, write_report(report, ctx.run_dir), report.exit_code)


# ---------------------------------------------------------------- CLI entry


def pipeline_main(
    profile: str | None,
    config: str | Path | None,
    sets: Sequence[str],
    run_dir: str | Path | None,
    out: IO[str] | None = None,
    *,
    deps: PipelineDeps | None = None,
) -> int:
    """`finetune pipeline`: exit 0 when every stage and gate passed, 1 when one failed, 2 on bad input."""
    out = out or sys.stdout
    try:
        cfg = load_config(profile, config, list(sets))
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    if run_dir is None:
        from finetune.workflow import new_run_dir

        run_dir = new_run_dir(cfg)
    try:
        result = run_pipeline(cfg, Path(run_dir), deps=deps, log=lambda m: print(m, file=out, flush=True))
    except KeyboardInterrupt:
        print(f"interrupted; rerun with --run-dir {run_dir} to continue", file=out)
        return 130
    print(render_summary(result.report), file=out)
    print(f"report: {result.report_path}", file=out)
    return result.exit_code


def render_summary(report: PipelineReport) -> str:
    lines = [f"pipeline {report.status.upper()} in {report.seconds:.0f} s ({report.run_dir})"]
    for s in report.stages:
        lines.append(f"  {s.status:8} {s.name:9} {s.seconds:7.1f} s" + (f"  {s.reason}" if s.reason else ""))
    for g in report.gates:
        lines.append(f"  [{g.status.upper()}] {g.name}: {g.detail}")
    for sc in report.scores:
        lines.append(
            f"  score {sc.runtime:12} train {sc.train.contains}/{sc.train.n}  heldout {sc.heldout.contains}/{sc.heldout.n}"
        )
    return "\n".join(lines)
