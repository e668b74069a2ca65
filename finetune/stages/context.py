"""The one stage model every command shares.

A Stage is a plain function of a Ctx that writes into the run directory and returns a StageReport; its
`inputs` name everything its output depends on (config sections, upstream stages' digests and artifacts;
the runner adds the code version, the user's files by content and the tools' versions: finetune.stages.keys), so a
rerun skips a stage whose inputs are unchanged and whose artifacts still hash to the recorded digests.
Collaborators come in through Deps, so tier 1 (the test level) runs every stage with fakes and no patching.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping, Sequence
from contextlib import AbstractContextManager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from finetune.config.schema import DataConfig, RunConfig
from finetune.gates.verdict import Verdict
from finetune.report.models import StageReport

Log = Callable[[str], None]


class StageError(RuntimeError):
    """A stage failed; `details` (checks, measurements) still go into the report."""

    def __init__(self, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.details = details or {}


class Reported(Protocol):
    """What a collaborator returns to be kept in the report: a plain dict of it."""

    def to_dict(self) -> dict[str, Any]: ...


class Train(Protocol):  # finetune.train.engine.train_run
    def __call__(
        self,
        cfg: RunConfig,
        model_path: Path,
        data_dir: Path,
        run_dir: Path,
        *,
        resume: bool = False,
        on_trained: Callable[[Any, Any], None] | None = None,
        log: Log = print,
    ) -> Reported: ...


class MeasureLearning(Protocol):  # finetune.evaluate.run_measurements.measure_learning -> LearningMeasurement
    def __call__(
        self, run_dir: Path, base_dir: Path, cfg: RunConfig, stops: Sequence[str], *, max_tokens: int
    ) -> Any: ...


class MeasureMemory(Protocol):  # finetune.train.peak_memory.measure_memory -> MemoryMeasurement
    def __call__(
        self,
        run_dir: Path,
        model_dir: Path,
        model_config: dict,
        cfg: RunConfig,
        *,
        available: int | None,
        run_peak: int | None = None,
    ) -> Any: ...


class Fuse(Protocol):  # finetune.export.fuse.fuse -> the fused folder
    def __call__(
        self, base_path: Path, adapter_path: Path, out_dir: Path, *, dtype: str | None = None
    ) -> Path: ...


@dataclass
class Deps:
    """Every collaborator a stage calls, with the signature it is called with; tier 1 replaces the model,
    trainer and runtime ones with fakes (tests/fakes.py), so no test patches a module."""

    resolve_model: Callable[[str], Any]  # spec -> ResolvedModel(.name, .path, .source, .config, .license)
    load_tokenizer: Callable[[Path], Any]
    prepare_data: Callable[
        [DataConfig, Path, Any], Reported
    ]  # (cfg.data, out_dir, tokenizer) -> PrepareReport
    estimate: Callable[
        [RunConfig, dict, dict | None], Any
    ]  # (cfg, model config, prepare report) -> MemoryEstimate
    train: Train
    measure_learning: MeasureLearning
    measure_memory: MeasureMemory
    masked_rows: Callable[[Path, Any, int], list]  # (run_dir, tokenizer, max_seq_length) -> [MaskedRow]
    fuse: Fuse
    measure_fuse: Callable[[Path, Path, Path], Any]  # (base, adapter, fused) -> FuseMeasurement
    export_gguf: Callable[[Path, Path, str], Any]  # (hf_dir, out_path, outtype)
    check_gguf: Callable[[Path, Path], list[str]]  # (gguf, hf_dir) -> problems
    locate_ollama: Callable[[], Any]  # -> OllamaLocation(binary, source, reason)
    ollama_server: Callable[[Path, Path], AbstractContextManager[Any]]  # (binary, dir) -> a running server
    deploy: Callable[
        [Any, str, Path, str, Path], Any
    ]  # (server, name, gguf, Modelfile text, dir) -> DeployResult
    served_checks: Callable[[Any, str, str], list[Any]]  # (client, model, question) -> [ApiCheck]
    ollama_answers: Callable[[Any, str, Sequence[Any]], list[Any]]  # (server, model, prompts) -> [Answer]
    # (server, model, messages) -> /v1/chat/completions answers: {"defaults": [...], "greedy": {...}}
    openai_answers: Callable[[Any, str, Sequence[dict]], dict[str, Any]]
    llamacpp_reason: Callable[[], str | None]  # why llama.cpp cannot run here; None if it can
    evaluate: Callable[[Any, Log], Any]  # (EvalInputs, log) -> RuntimeMeasurements
    collect_env: Callable[[], dict[str, Any]]
    describe_machine: Callable[[], str]  # printed before training: backend, BLAS, threads, memory
    available_memory: Callable[[], int | None]
    tool_version: Callable[[str], str | None]  # a package (or keys.CONVERTER) -> its version
    ollama_version: Callable[[Path], str]  # a binary -> the version it reports
    # (cfg, run_dir, base, form, locate_ollama, ollama_server) -> Shipped: `finetune export RUN --as FORM`'s
    # own code (finetune.recipes.export_adapter.ship_in_run, a layer above: the CLI wires it in)
    ship_form: Callable[..., Any] | None = None
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)
    # (run_dir, model_dir, model_config, cfg, available=) -> finish(cancel) -> what happened: the full fine-tuning
    # probe run beside training (finetune.train.peak_memory.prefetch_full); tier 1 measures nothing
    prefetch_memory: Callable[..., Callable[[bool], str]] = lambda *a, **k: lambda cancel: "no full probe"
    # (run_dir, base_dir, after=finish, evaluation=) -> finish(cancel), or None: the base model's learning
    # measurement (and evaluation answers), made beside training once `after` is done
    # (finetune.evaluate.base_prefetch); tier 1 measures nothing
    prefetch_base_learning: Callable[..., Callable[[bool], str] | None] = lambda *a, **k: None


@dataclass(frozen=True)
class Stage:
    name: str
    run: Callable[[Ctx], StageReport]
    inputs: Callable[[Ctx], dict[str, Any]]
    required: bool = True  # a skip of a required stage degrades the run unless allowed


BASE_LEARNING = "base_learning"  # Ctx.beside: the base's learning measurement, which the judge waits for


@dataclass
class Ctx:
    cfg: RunConfig
    run_dir: Path
    deps: Deps
    log: Log
    command: str  # finetune <command>
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
    # work a stage started beside itself that a later stage waits for: name -> finish(cancel) -> what happened;
    # what no stage took is stopped when the command ends (finetune.recipes.execution)
    beside: dict[str, Callable[[bool], str]] = field(default_factory=dict)

    def wants(self, gate: str) -> bool:
        """The command requires this gate and the user did not skip it."""
        return gate in self.required_gates and gate not in self.cfg.gates.skip

    def section(self, *names: str) -> dict[str, Any]:
        """Config sections as stage inputs."""
        data = self.cfg.to_dict()
        return {n: data[n] for n in names}

    def upstream(self, *names: str) -> dict[str, Any]:
        """Upstream stages as inputs: their inputs digest and the sha256 of each artifact they made."""
        return {n: {"digest": self.digests.get(n), "artifacts": self.artifacts.get(n, {})} for n in names}
