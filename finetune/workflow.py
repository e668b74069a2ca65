"""The training workflow in data-flow order: model -> data -> estimate -> train -> gates -> summary.

Each stage is a plain callable in `Stages`, so tier 1 swaps the model and trainer for fakes
without patching, and the real CLI wires the real ones.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune.atomic import atomic_write_json
from finetune.config import RunConfig, save_config


@dataclass
class Stages:
    resolve_model: Callable[[str], Any]  # spec -> object with .path and .config (dict)
    load_tokenizer: Callable[[Path], Any]
    prepare_data: Callable[[RunConfig, Path, Any], Any]  # (cfg, out_dir, tokenizer) -> report with .to_dict()
    estimate: Callable[[RunConfig, dict], Any]  # (cfg, model config) -> estimate with .to_dict()
    train: Callable[..., Any]  # (cfg, model_path, data_dir, run_dir, resume=) -> TrainResult
    gates: Callable[[RunConfig, Path, Any], list]  # -> list of verdicts with .to_dict() and .passed
    log: Callable[[str], None] = print


@dataclass
class WorkflowResult:
    run_dir: Path
    summary_path: Path
    stages: list[dict] = field(default_factory=list)
    passed: bool = False


def new_run_dir(cfg: RunConfig, base: Path | None = None) -> Path:
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    return Path(base or cfg.output_dir) / f"{cfg.profile or 'run'}-{stamp}"


def run_workflow(cfg: RunConfig, run_dir: Path, stages: Stages, *, resume: bool = False) -> WorkflowResult:
    """Run every stage in order; the summary records each stage's status and time, even on failure."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    save_config(cfg, run_dir / "config.yaml")
    result = WorkflowResult(run_dir, run_dir / "summary.json")
    ctx: dict[str, Any] = {}

    def stage(name: str, fn: Callable[[], Any], describe: Callable[[Any], dict] = lambda _: {}) -> Any:
        tic = time.perf_counter()
        entry: dict[str, Any] = {"stage": name, "status": "running"}
        result.stages.append(entry)
        stages.log(f"[{name}] ...")
        try:
            out = fn()
        except BaseException as exc:
            entry.update(
                status="failed", error=f"{type(exc).__name__}: {exc}", seconds=time.perf_counter() - tic
            )
            _write_summary(result, cfg, ctx)
            raise
        entry.update(status="passed", seconds=round(time.perf_counter() - tic, 3), **describe(out))
        return out

    model = stage("model", lambda: stages.resolve_model(cfg.model.name), lambda m: {"path": str(m.path)})
    tokenizer = stage("tokenizer", lambda: stages.load_tokenizer(Path(model.path)))
    data_dir = run_dir / "data"
    report = stage(
        "data", lambda: stages.prepare_data(cfg, data_dir, tokenizer), lambda r: {"report": _as_dict(r)}
    )
    ctx["data"] = _as_dict(report)
    est = stage("estimate", lambda: stages.estimate(cfg, model.config), lambda e: {"estimate": _as_dict(e)})
    ctx["estimate"] = _as_dict(est)
    trained = stage(
        "train",
        lambda: stages.train(cfg, Path(model.path), data_dir, run_dir, resume=resume),
        lambda r: {"result": _as_dict(r)},
    )
    ctx["train"] = _as_dict(trained)
    verdicts = stage(
        "gates",
        lambda: stages.gates(cfg, run_dir, trained),
        lambda vs: {"verdicts": [_as_dict(v) for v in vs]},
    )
    result.passed = all(v.passed for v in verdicts) and not getattr(trained, "interrupted", False)
    _write_summary(result, cfg, ctx)
    return result


def _as_dict(obj: Any) -> Any:
    return obj.to_dict() if hasattr(obj, "to_dict") else obj


def _write_summary(result: WorkflowResult, cfg: RunConfig, ctx: dict) -> None:
    atomic_write_json(
        result.summary_path,
        {
            "profile": cfg.profile,
            "model": cfg.model.name,
            "run_dir": str(result.run_dir),
            "finished_at": datetime.now(UTC).isoformat(timespec="seconds"),
            "passed": result.passed,
            "stages": result.stages,
        },
    )
