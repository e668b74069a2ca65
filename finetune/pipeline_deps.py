"""The tier 3 pipeline's plumbing: stage results, the injectable collaborators, the run context, the
Ollama session, and the real collaborators (the `finetune train` subprocess, llama.cpp's availability).

Collaborators come in through `PipelineDeps`, so unit tests drive every stage with fakes and no patching.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from finetune.config import RunConfig
from finetune.evaluate import EvalInputs, EvalPrompt, EvalSettings
from finetune.report import Artifact

Log = Callable[[str], None]
TRAIN_TIMEOUT_S = 3600.0  # a hung trainer must not hold the pipeline (and its Ollama server) forever
TRAIN_DIGEST = ".pipeline-digest"  # in the train folder: which inputs its checkpoints belong to
FUSE_DTYPE = "float32"  # keeps small LoRA deltas that bf16 would round away (finetune.fuse)
ALLOW_NO_RUNTIME = "FT_ALLOW_NO_RUNTIME"


class StageError(RuntimeError):
    """A stage failed; `details` (checks, gate verdicts) still go into the report."""

    def __init__(self, message: str, details: dict[str, Any] | None = None):
        super().__init__(message)
        self.details = details or {}


@dataclass
class StageResult:
    outputs: dict[str, Any] = field(default_factory=dict)
    artifacts: list[Artifact] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)
    status: str = "passed"  # or "skipped" (degraded: e.g. no Ollama), with reason
    reason: str | None = None
    cache: bool = True  # False: re-decide next run (a degraded skip may not hold on another machine)


@dataclass
class PipelineDeps:
    resolve_model: Callable[[str], Any]  # spec -> object with .name, .path, .source
    load_tokenizer: Callable[[Path], Any]
    prepare_data: Callable[[RunConfig, Path, Any], Any]
    train: Callable[[Sequence[str], Path, Log], int]  # (`finetune` CLI args, log file, log) -> exit code
    fuse: Callable[[Path, Path, Path], Any]  # (base, adapter, out_dir)
    export_gguf: Callable[[Path, Path, str], Any]  # (hf_dir, out_path, outtype)
    check_gguf: Callable[[Path, Path], list[str]]
    locate_ollama: Callable[[], Any]  # -> OllamaLocation(binary, source, reason)
    ollama_server: Callable[[Path, Path], Any]  # (binary, dir) -> context manager yielding a server
    deploy: Callable[..., Any]  # finetune.deploy.deploy signature
    served_checks: Callable[[Any, str, str], list[Any]]
    ollama_answers: Callable[[Any, str, Sequence[EvalPrompt], int], list[Any]]
    llamacpp_reason: Callable[[], str | None]  # why llama.cpp cannot run here; None if it can
    evaluate: Callable[[EvalInputs, Log], Any]  # -> EvalOutcome
    collect_env: Callable[[], dict[str, Any]]
    environ: Mapping[str, str] = field(default_factory=lambda: os.environ)


@dataclass
class Ctx:
    cfg: RunConfig
    run_dir: Path
    deps: PipelineDeps
    log: Log
    settings: EvalSettings
    session: OllamaSession
    outputs: dict[str, dict[str, Any]] = field(default_factory=dict)  # stage name -> its outputs
    digests: dict[str, str] = field(default_factory=dict)  # stage name -> its inputs digest
    artifacts: dict[str, dict[str, str]] = field(default_factory=dict)  # stage -> artifact name -> sha256


# ---------------------------------------------------------------- Ollama session


class OllamaSession:
    """One Ollama server for the run, started on first use and always stopped by the pipeline's ExitStack."""

    def __init__(self, deps: PipelineDeps, folder: Path, stack: contextlib.ExitStack):
        self.deps, self.folder, self.stack = deps, folder, stack
        self.server: Any = None
        self.models: set[str] = set()
        self.cleanup_result: dict[str, Any] = {}

    def start(self, binary: Path) -> Any:
        if self.server is None:
            self.stack.callback(self._stopped)  # LIFO: runs after the server's own exit has stopped it
            self.server = self.stack.enter_context(self.deps.ollama_server(binary, self.folder))
        return self.server

    def ensure_model(self, binary: Path, name: str, modelfile: Path) -> Any:
        """The model as deployed earlier; re-created from its Modelfile when this run skipped the deploy."""
        server = self.start(binary)
        if name not in self.models:
            listed = server.list_models()
            if name not in listed and f"{name}:latest" not in listed:
                server.create_model(name, modelfile)
            self.models.add(name)
        return server

    def delete_models(self) -> None:
        if self.server is None:
            return
        for name in sorted(self.models):
            try:
                self.server.delete_model(name)
                listed = self.server.list_models()
                gone = name not in listed and f"{name}:latest" not in listed
                self.cleanup_result[name] = {
                    "deleted": gone,
                    "detail": "deleted" if gone else f"still listed: {listed}",
                }
            except Exception as exc:
                self.cleanup_result[name] = {"deleted": False, "detail": f"{type(exc).__name__}: {exc}"}

    def _stopped(self) -> None:
        if self.server is not None:
            self.cleanup_result["server_stopped"] = getattr(self.server, "pid", None) is None


# ---------------------------------------------------------------- real collaborators


def run_finetune_cli(
    args: Sequence[str], log_path: Path, log: Log, *, timeout: float = TRAIN_TIMEOUT_S
) -> int:
    """`finetune ARGS` as a user would run it (the venv's script, else `python -m finetune.cli`); output is
    copied to log_path and to `log`. Killed after `timeout` seconds, or when this process is interrupted."""
    script = Path(sys.executable).with_name("finetune")
    cmd = [str(script)] if script.is_file() else [sys.executable, "-m", "finetune.cli"]
    env = {**os.environ, "NO_COLOR": "1"}  # plain text in the log file
    proc = subprocess.Popen([*cmd, *args], stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, bufsize=1, env=env)  # fmt: skip
    timed_out = threading.Event()

    def kill() -> None:
        timed_out.set()
        proc.kill()

    timer = threading.Timer(timeout, kill)
    timer.start()
    try:
        with open(log_path, "a", encoding="utf-8") as fh:
            assert proc.stdout is not None
            for line in proc.stdout:
                fh.write(line)
                fh.flush()
                log(f"  | {line.rstrip()}")
        code = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    if timed_out.is_set():
        log(f"[train] killed after {timeout:.0f} s (TRAIN_TIMEOUT_S)")
    return code


def llamacpp_reason() -> str | None:
    import importlib.util

    if importlib.util.find_spec("xllamacpp") is None:
        return "PyPI xllamacpp is not installed (`make setup` installs it)"
    return None


def real_deps() -> PipelineDeps:
    from finetune import (
        deploy,
        doctor,
        evaluate,
        fuse,
        gguf_export,
        gguf_inspect,
        models,
        ollama_provision,
        ollama_server,
        runner,
    )

    return PipelineDeps(
        resolve_model=models.resolve_model,
        load_tokenizer=runner.load_tokenizer,
        prepare_data=runner.prepare_data,
        train=run_finetune_cli,
        fuse=lambda base, adapter, out: fuse.fuse(base, adapter, out, dequantize=True, dtype=FUSE_DTYPE),
        export_gguf=lambda hf, out, outtype: gguf_export.export_gguf(hf, out, outtype=outtype),
        check_gguf=gguf_inspect.check_gguf,
        locate_ollama=ollama_provision.locate_ollama,
        ollama_server=lambda binary, folder: ollama_server.OllamaServer(binary, folder),
        deploy=deploy.deploy,
        served_checks=deploy.served_checks,
        ollama_answers=evaluate.ollama_answers,
        llamacpp_reason=llamacpp_reason,
        evaluate=lambda inputs, log: evaluate.run_evaluation(inputs, evaluate.real_backends(), log=log),
        collect_env=lambda: doctor.collect(),
    )
