"""The tiers: which stages each runs and which gates it requires. Everything else is shared.

run       `finetune run` (tiers 1 and 2): model -> data -> estimate -> train -> judge (the five training gates
          and the label mask)
train     `finetune train`: model -> data -> train; its status is "not_judged", never "passed"
validate  `finetune validate RUN`: model -> judge again, from what RUN saved
pipeline  `finetune pipeline` (tier 3): model -> data -> train -> judge -> fuse -> gguf -> ollama -> evaluate

A run with a fault planted (finetune/faults.py) ends "fault_injected", exit 4, whatever its gates say.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from finetune import faults
from finetune.config.schema import RunConfig
from finetune.gates.registry import PIPELINE_GATES, RUNTIME_OF, TRAINING_GATES, explain
from finetune.gates.status import allowed_skips, decide
from finetune.gates.verdict import Verdict, skipped
from finetune.report.models import GateReport, OllamaReport, RunReport, write_report
from finetune.report.summary import render_summary
from finetune.system import procs, signals
from finetune.system.atomic import remove_stale_temporaries
from finetune.system.lock import run_dir_lock
from finetune.tiers.context import Ctx, Deps, Stage
from finetune.tiers.judge import JUDGE
from finetune.tiers.ollama_session import OllamaSession
from finetune.tiers.rundir import resume_command
from finetune.tiers.runner import record_path, run_stages
from finetune.tiers.stage_keys import code_version
from finetune.tiers.stages_ship import SHIP_STAGES
from finetune.tiers.stages_train import TRAIN_STAGES


@dataclass(frozen=True)
class Tier:
    name: str
    stages: tuple[Stage, ...]
    required_gates: tuple[str, ...]
    judged: bool = True


def _named(*names: str) -> tuple[Stage, ...]:
    by_name = {s.name: s for s in (*TRAIN_STAGES, JUDGE, *SHIP_STAGES)}
    return tuple(by_name[n] for n in names)


# Which gates each command requires: derived from the gate table (finetune.gates.registry).
TIERS = {
    "run": Tier("run", _named("model", "data", "estimate", "train", "judge"), TRAINING_GATES),
    "train": Tier("train", _named("model", "data", "train"), (), judged=False),
    "validate": Tier("validate", _named("model", "judge"), TRAINING_GATES),
    "pipeline": Tier(
        "pipeline",
        _named("model", "data", "train", "judge", "fuse", "gguf", "ollama", "evaluate"),
        PIPELINE_GATES,
    ),
}


@dataclass
class TierResult:
    report: RunReport
    report_path: Path
    exit_code: int


def run_tier(
    tier: Tier,
    cfg: RunConfig,
    run_dir: Path,
    deps: Deps,
    *,
    log: Callable[[str], None] = print,
    settings: Any = None,
    force: Sequence[str] = (),
    command: str | None = None,
    heartbeat_s: float = 15.0,
) -> TierResult:
    """Run a tier in run_dir (which must already own cfg as its config.yaml) and write report.json."""
    run_dir = Path(run_dir).absolute()
    command = command or tier.name
    faults.injected()  # a fault without the harness's arming key is refused before any work
    with run_dir_lock(run_dir, f"finetune {command}"), signals.handled():
        for stale in procs_dirs(run_dir):
            for record in procs.sweep(stale):
                log(f"stopped {record['name']} (pid {record['pid']}) left running by an earlier command")
        for path, size in remove_stale_temporaries(run_dir):
            log(
                f"removed {path.relative_to(run_dir)} ({size} bytes), left half-written by an interrupted command"
            )
        for name in force:
            record_path(run_dir, name).unlink(missing_ok=True)
        started, tic = datetime.now(UTC), time.perf_counter()
        with contextlib.ExitStack() as stack:
            session = OllamaSession(deps, run_dir / "ollama", stack)
            ctx = Ctx(
                cfg,
                run_dir,
                deps,
                log,
                tier.name,
                tier.required_gates,
                settings=settings,
                session=session,
                expected=_usual_seconds(tier, cfg),
                heartbeat_s=heartbeat_s,
            )
            try:
                stages, bad_input, stop = run_stages(ctx, tier.stages)
            finally:
                with contextlib.suppress(Exception), signals.deferred():
                    session.delete_models()
        # The ExitStack has stopped the server (also on a signal): its cleanup record is complete now.
        return _finish(tier, ctx, stages, bad_input, stop, started, tic, command)


def _usual_seconds(tier: Tier, cfg: RunConfig) -> dict[str, float]:
    from finetune.report.history import history_path, load
    from finetune.tiers.progress import expected_seconds

    try:
        return expected_seconds(load(history_path(cfg.output_dir)), tier.name, cfg.model.name)
    except Exception:  # a damaged history only costs the ETA
        return {}


def procs_dirs(run_dir: Path) -> list[Path]:
    return [p for p in run_dir.rglob(procs.PID_DIR) if p.is_dir()]


def _verdicts(tier: Tier, ctx: Ctx, stages: Sequence[Any]) -> list[Verdict]:
    have = {v.name for v in ctx.verdicts}
    failed = next((s.name for s in stages if s.status == "failed"), None)
    missing = []
    for name in tier.required_gates:
        if name not in have:
            why = f"not judged: stage {failed} failed" if failed else "not judged"
            missing.append(explain(skipped(name, why)))
    return [*ctx.verdicts, *missing]


def _finish(
    tier: Tier,
    ctx: Ctx,
    stages: list,
    bad_input: bool,
    stop: signals.Interrupted | None,
    started: datetime,
    tic: float,
    command: str,
) -> TierResult:
    verdicts = _verdicts(tier, ctx, stages)
    allowed = allowed_skips(ctx.deps.environ, ctx.cfg.gates.skip)
    outcome = decide(
        [s.model_dump() for s in stages],
        verdicts,
        required_gates=tier.required_gates,
        allowed=allowed,
        gate_stages=RUNTIME_OF,
        bad_input=bad_input,
        interrupted=stop.signum if stop else None,
    )
    status, code, reasons = outcome.status, outcome.exit_code, outcome.reasons
    if not tier.judged and status == "passed":
        status = "not_judged"
    planted = faults.injected()
    if planted and status not in ("bad_input", "interrupted"):  # a broken run never looks green
        status, code = faults.STATUS, faults.EXIT_CODE
        reasons = [f"faults planted on purpose ({faults.ENV}): {', '.join(planted)}", *reasons]
    try:
        env = ctx.deps.collect_env()
    except Exception as exc:  # the report must still be written
        env = {"error": f"{type(exc).__name__}: {exc}"}
    evaluate = ctx.outputs.get("evaluate", {})
    report = RunReport(
        tier=tier.name,
        status=status,
        exit_code=code,
        reasons=reasons,
        allowed_skips=outcome.allowed,
        faults=planted,
        resume_command=resume_command(command, ctx.run_dir) if stop else None,
        profile=ctx.cfg.profile,
        model=ctx.cfg.model.name,
        model_license=(ctx.outputs.get("model") or {}).get("license"),
        run_dir=str(ctx.run_dir),
        code_version=code_version(),
        started_at=started.isoformat(timespec="seconds"),
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        seconds=round(time.perf_counter() - tic, 3),
        config=ctx.cfg.to_dict(),
        stages=stages,
        gates=[GateReport(**v.to_dict()) for v in verdicts],
        scores=evaluate.get("scores", []),
        ollama=_ollama_report(ctx, stages) if any(s.name == "ollama" for s in stages) else None,
        environment=env,
    )
    path = write_report(report, ctx.run_dir)
    _publish(report, ctx)
    return TierResult(report, path, code)


def _publish(report: RunReport, ctx: Ctx) -> None:
    """report.html beside report.json, and one line in the run history; neither can change the verdict."""
    from finetune.report import history
    from finetune.report.html import write_html

    for what, publish in (
        ("report.html", lambda: write_html(report, ctx.run_dir)),
        (
            "history",
            lambda: history.append(
                history.record_from_report(report), history.history_path(ctx.cfg.output_dir)
            ),
        ),
    ):
        try:
            publish()
        except Exception as exc:  # a plot or a full disk must not turn a verdict into a crash
            ctx.log(f"warning: could not write the {what}: {type(exc).__name__}: {exc}")


def _ollama_report(ctx: Ctx, stages: Sequence[Any]) -> OllamaReport:
    entry = next(s for s in stages if s.name == "ollama")
    d = entry.details
    cleanup = ctx.session.cleanup_result
    model = d.get("model")
    deleted = cleanup.get(model, {}).get("deleted") if model in cleanup else None
    status = "failed" if entry.status == "failed" else entry.status
    return OllamaReport(
        status=status,
        reason=entry.reason,
        binary=d.get("binary"),
        version=d.get("version"),
        model=model,
        modelfile=d.get("modelfile"),
        deleted=deleted,
        server_stopped=cleanup.get("server_stopped"),
        deploy_checks=d.get("deploy_checks", []),
        served_checks=d.get("served_checks", []),
    )


def print_result(result: TierResult, out: IO[str] | None = None) -> None:
    out = out or sys.stdout
    print(render_summary(result.report), file=out)
    print(f"report: {result.report_path}", file=out)
