"""What every command does around its stages: own the run directory while it works, then decide and report.

`open_run` takes the run directory's lock, turns SIGTERM/SIGHUP into a clean stop, stops children and
removes half-written files an earlier command left, and gives the recipe a `Run` to call stages on. When the
recipe's block ends (also on a signal), the run's Ollama models and server are stopped and `finish` writes
report.json (the verdict), report.html and one history line. A run with a fault planted (finetune/faults.py)
ends "fault_injected", exit 4, whatever its gates say.
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any

from finetune import faults
from finetune.config.schema import RunConfig
from finetune.gates.provenance import explain
from finetune.gates.registry import RUNTIME_OF
from finetune.gates.status import allowed_skips, decide
from finetune.gates.verdict import Verdict, skipped
from finetune.report.models import OllamaReport, RunReport, write_report
from finetune.report.summary import render_summary
from finetune.stages.context import Ctx, Deps, Log
from finetune.stages.keys import code_version
from finetune.stages.ollama_session import OllamaSession
from finetune.stages.rundir import resume_command
from finetune.stages.runner import Run, record_path
from finetune.system import procs, signals
from finetune.system.atomic import remove_stale_temporaries
from finetune.system.lock import run_dir_lock
from finetune.system.owned import MARKER, NotOwned, is_owned


@dataclass
class Finished:
    report: RunReport
    report_path: Path
    exit_code: int


@dataclass(frozen=True)
class Command:
    name: str  # finetune <name>
    gates: tuple[str, ...]  # the gates it requires
    judged: bool = True  # False: "not_judged" is its best status (finetune train)


@contextlib.contextmanager
def open_run(
    command: Command,
    cfg: RunConfig,
    run_dir: Path,
    deps: Deps,
    *,
    log: Log = print,
    settings: Any = None,
    force: Sequence[str] = (),
    heartbeat_s: float = 15.0,
) -> Iterator[Run]:
    """A Run in run_dir (which must already own cfg as its config.yaml); `run.finished` holds the verdict after."""
    run_dir = Path(run_dir).absolute()
    if not is_owned(run_dir):  # own_config claims it; a caller that skipped that must not write here
        raise NotOwned(f"{run_dir}: not a FineTune run directory (no {MARKER}); start runs with own_config")
    faults.injected()  # a fault without the harness's arming key is refused before any work
    with run_dir_lock(run_dir, f"finetune {command.name}"), signals.handled():
        _tidy(run_dir, log, force)
        started, tic = datetime.now(UTC), time.perf_counter()
        with contextlib.ExitStack() as stack:
            session = OllamaSession(deps, run_dir / "ollama", stack)
            ctx = Ctx(
                cfg, run_dir, deps, log, command.name, command.gates, settings=settings, session=session
            )
            ctx.expected, ctx.heartbeat_s = _usual_seconds(command.name, cfg), heartbeat_s
            stack.callback(_stop_beside, ctx)  # nothing started beside a stage outlives the command
            run = Run(ctx)
            try:
                yield run
            except (signals.Interrupted, KeyboardInterrupt) as exc:  # between two stages
                run.stop = run.stop or signals.as_interrupted(exc)
            finally:
                with contextlib.suppress(Exception), signals.deferred():
                    session.delete_models()
        # The ExitStack has stopped the server (also on a signal): its cleanup record is complete now.
        run.finished = finish(command, run, started, tic)


def _stop_beside(ctx: Ctx) -> None:
    for name in list(ctx.beside):
        with contextlib.suppress(Exception):
            ctx.beside.pop(name)(True)


def _tidy(run_dir: Path, log: Log, force: Sequence[str]) -> None:
    """Stop what an earlier command left running, remove what it left half-written, forget forced stages."""
    for stale in [p for p in run_dir.rglob(procs.PID_DIR) if p.is_dir()]:
        for record in procs.sweep(stale):
            log(f"stopped {record['name']} (pid {record['pid']}) left running by an earlier command")
    for path, size in remove_stale_temporaries(run_dir):
        log(
            f"removed {path.relative_to(run_dir)} ({size} bytes), left half-written by an interrupted command"
        )
    for name in force:
        record_path(run_dir, name).unlink(missing_ok=True)


def _usual_seconds(command: str, cfg: RunConfig) -> dict[str, float]:
    from finetune.report.history import history_path, load
    from finetune.stages.progress import expected_seconds

    try:
        return expected_seconds(load(history_path(cfg.output_dir)), command, cfg.model.name)
    except Exception:  # a damaged history only costs the ETA
        return {}


def _verdicts(command: Command, run: Run) -> list[Verdict]:
    """The stages' verdicts, and a skipped one for each required gate no stage judged."""
    have = {v.name for v in run.ctx.verdicts}
    why = f"not judged: stage {run.failed} failed" if run.failed else "not judged"
    missing = [explain(skipped(name, why)) for name in command.gates if name not in have]
    return [*run.ctx.verdicts, *missing]


def finish(command: Command, run: Run, started: datetime, tic: float) -> Finished:
    """Decide the run's status; write report.json, report.html and history. A signal while report.html is
    drawn ends the run interrupted (exit 128+N, with its resume command, which draws it); one while the
    report or history is written is acted on once they are whole."""
    ctx = run.ctx
    with signals.deferred():
        report = _decided(command, run, started, tic)
    try:
        _draw(report, ctx)
    except (signals.Interrupted, KeyboardInterrupt) as exc:
        run.stop = signals.as_interrupted(exc)
        ctx.log(
            f"report.html not drawn: interrupted by {run.stop.name}; `{resume_command(command.name, ctx.run_dir)}` draws it"
        )
        with signals.deferred():
            report = _decided(command, run, started, tic)
    with signals.deferred():
        if (signum := signals.pending()) is not None and run.stop is None:
            run.stop = signals.Interrupted(signum)
            report = _decided(command, run, started, tic)
        path = write_report(report, ctx.run_dir)
        _add_to_history(report, ctx)
    return Finished(report, path, report.exit_code)


def _decided(command: Command, run: Run, started: datetime, tic: float) -> RunReport:
    """The run's report: its status decided from its stages and verdicts."""
    ctx, verdicts = run.ctx, _verdicts(command, run)
    outcome = decide(
        [s.model_dump() for s in run.reports],
        verdicts,
        required_gates=command.gates,
        allowed=allowed_skips(ctx.deps.environ, ctx.cfg.gates.skip),
        gate_stages=RUNTIME_OF,
        bad_input=run.bad_input,
        interrupted=run.stop.signum if run.stop else None,
    )
    status, code, reasons = outcome.status, outcome.exit_code, outcome.reasons
    if not command.judged and status == "passed":
        status = "not_judged"
    planted = faults.injected()
    if planted and status not in ("bad_input", "interrupted"):  # a broken run never looks green
        status, code = faults.STATUS, faults.EXIT_CODE
        reasons = [f"faults planted on purpose ({faults.ENV}): {', '.join(planted)}", *reasons]
    report = RunReport(
        command=command.name,
        status=status,
        exit_code=code,
        reasons=reasons,
        allowed_skips=outcome.allowed,
        faults=planted,
        resume_command=resume_command(command.name, ctx.run_dir) if run.stop else None,
        profile=ctx.cfg.profile,
        model=ctx.cfg.model.name,
        model_license=(ctx.outputs.get("model") or {}).get("license"),
        run_dir=str(ctx.run_dir),
        code_version=code_version(),
        started_at=started.isoformat(timespec="seconds"),
        finished_at=datetime.now(UTC).isoformat(timespec="seconds"),
        seconds=round(time.perf_counter() - tic, 3),
        config=ctx.cfg.to_dict(),
        stages=run.reports,
        gates=verdicts,
        scores=ctx.outputs.get("evaluate", {}).get("scores", []),
        ollama=_ollama_report(run) if any(s.name == "ollama" for s in run.reports) else None,
        environment=_environment(ctx.deps.collect_env),
    )
    return report


def _environment(collect: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    try:
        return collect()
    except Exception as exc:  # the report must still be written
        return {"error": f"{type(exc).__name__}: {exc}"}


def _draw(report: RunReport, ctx: Ctx) -> None:
    """report.html beside report.json; a plot that fails must not turn a verdict into a crash."""
    from finetune.report.html import write_html

    try:
        write_html(report, ctx.run_dir)
    except Exception as exc:
        ctx.log(f"warning: could not write the report.html: {type(exc).__name__}: {exc}")


def _add_to_history(report: RunReport, ctx: Ctx) -> None:
    from finetune.report import history

    try:
        history.append(history.record_from_report(report), history.history_path(ctx.cfg.output_dir))
    except Exception as exc:  # a full disk must not turn a verdict into a crash
        ctx.log(f"warning: could not write the history: {type(exc).__name__}: {exc}")


def _ollama_report(run: Run) -> OllamaReport:
    entry = next(s for s in run.reports if s.name == "ollama")
    d, cleanup = entry.details, run.ctx.session.cleanup_result
    model = d.get("model")
    return OllamaReport(
        status=entry.status,
        reason=entry.reason,
        binary=d.get("binary"),
        version=d.get("version"),
        model=model,
        modelfile=d.get("modelfile"),
        deleted=cleanup.get(model, {}).get("deleted") if model in cleanup else None,
        server_stopped=cleanup.get("server_stopped"),
        deploy_checks=d.get("deploy_checks", []),
        served_checks=d.get("served_checks", []),
    )


def print_result(result: Finished, out: IO[str] | None = None) -> None:
    out = out or sys.stdout
    print(render_summary(result.report), file=out)
    print(f"report: {result.report_path}", file=out)
