"""The one stage model every tier shares.

A Stage is a plain function of a Ctx that writes into the run directory and returns a StageResult; its
`inputs` name everything its output depends on (config sections, upstream stages' digests and artifacts;
the runner adds the code version, the user's files by content and the tools' versions: stage_keys), so a
rerun skips a stage whose inputs are unchanged and whose artifacts still hash to the recorded digests.
Collaborators come in through Deps, so tier 1 runs every stage with fakes and no patching.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.config.schema import RunConfig
from finetune.gates.verdict import Verdict
from finetune.report.models import Artifact
from finetune.tiers import versions

Log = Callable[[str], None]


class StageError(RuntimeError):
    """A stage failed; `details` (checks, measurements) still go into the report."""

    def __init__(self, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.details = details or {}


@dataclass
class StageResult:
    outputs: dict[str, Any] = field(default_factory=dict)
    artifacts: list[Artifact] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    verdicts: list[Verdict] = field(default_factory=list)
    status: str = "passed"  # or "skipped" (e.g. no Ollama here), with reason
    reason: str | None = None
    cache: bool = True  # False: decide again next run (a skip for lack of a runtime may not hold next time)


@dataclass
class Deps:
    """Every collaborator a stage calls; tier 1 replaces the model and trainer ones with fakes."""

    resolve_model: Callable[[str], Any]  # spec -> object with .name, .path, .source, .config
    load_tokenizer: Callable[[Path], Any]
    prepare_data: Callable[[Any, Path, Any], Any]  # (cfg.data, out_dir, tokenizer) -> report with .to_dict()
    estimate: Callable[[RunConfig, dict, dict | None], Any]  # (cfg, model config, prepare report) -> estimate
    train: Callable[..., Any]  # finetune.train.engine.train_run's signature
    measure_learning: Callable[..., Any]
    measure_memory: Callable[..., Any]
    masked_rows: Callable[[Path, Any, int], list]
    fuse: Callable[..., Any]  # (base, adapter, out_dir, *, dtype): finetune.export.fuse.fuse
    measure_fuse: Callable[[Path, Path, Path], Any]
    export_gguf: Callable[[Path, Path, str], Any]  # (hf_dir, out_path, outtype)
    check_gguf: Callable[[Path, Path], list[str]]
    locate_ollama: Callable[[], Any]  # -> OllamaLocation(binary, source, reason)
    ollama_server: Callable[[Path, Path], Any]  # (binary, dir) -> context manager yielding a server
    deploy: Callable[..., Any]  # finetune.serve.deploy.deploy's signature
    served_checks: Callable[..., list[Any]]
    ollama_answers: Callable[[Any, str, Sequence[Any], int], list[Any]]
    llamacpp_reason: Callable[[], str | None]  # why llama.cpp cannot run here; None if it can
    evaluate: Callable[[Any, Log], Any]  # EvalInputs -> RuntimeMeasurements
    collect_env: Callable[[], dict[str, Any]]
    describe_machine: Callable[[], str]  # printed before training: backend, BLAS, threads, memory
    available_memory: Callable[[], int | None]
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    # a package (or versions.CONVERTER) -> its version; a binary -> the version it reports
    tool_version: Callable[[str], str | None] = versions.tool_version
    ollama_version: Callable[[Path], str] = versions.ollama_version


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Ctx], StageResult]
    inputs: Callable[[Ctx], dict[str, Any]]
    required: bool = True  # a skip of a required stage degrades the run unless allowed


@dataclass
class Ctx:
    cfg: RunConfig
    run_dir: Path
    deps: Deps
    log: Log
    tier: str
    required_gates: tuple[str, ...]
    resume: bool = False
    settings: Any = None  # finetune.evaluate.evaluation.EvalSettings for tier 3
    session: Any = None  # the run's OllamaSession
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage name -> its outputs
    digests: dict[str, str] = field(default_factory=dict)  # stage name -> its inputs digest
    artifacts: dict[str, dict[str, str]] = field(default_factory=dict)  # stage -> artifact name -> sha256
    verdicts: list[Verdict] = field(default_factory=list)
    expected: dict[str, float] = field(default_factory=dict)  # stage -> usual seconds (history), for the ETA
    heartbeat_s: float = 15.0  # 0: no progress lines (--quiet)
    changed: str | None = None  # a stage whose artifacts changed under the run: it and all later ones rerun

    def wants(self, gate: str) -> bool:
        """The tier requires this gate and the user did not skip it."""
        return gate in self.required_gates and gate not in self.cfg.gates.skip

    def section(self, *names: str) -> dict[str, Any]:
        """Config sections as stage inputs."""
        data = self.cfg.to_dict()
        return {n: data[n] for n in names}

    def upstream(self, *names: str) -> dict[str, Any]:
        """Upstream stages as inputs: their inputs digest and the sha256 of each artifact they made."""
        return {n: {"digest": self.digests.get(n), "artifacts": self.artifacts.get(n, {})} for n in names}
