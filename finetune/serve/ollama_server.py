"""Run a private `ollama serve` for tests and the deploy gate, and always stop it.

Each server gets its own loopback port, model store and HOME (Ollama writes ~/.ollama/id_ed25519) inside
run_dir, logs to run_dir/ollama-serve.log, and runs as a guarded child (finetune.system.procs): its own
process group, so stopping it also stops the model runners it spawned, and it cannot outlive FineTune
even when FineTune is killed. A port another process takes first is retried on a new free port.

    with OllamaServer(binary, run_dir) as server:
        server.create_model("demo", run_dir / "Modelfile")
        server.client().generate(model="demo", prompt="Hi")
"""

from __future__ import annotations

import atexit
import contextlib
import json
import os
import re
import shutil
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import psutil

from finetune.serve.ollama_provision import STAMP_NAME
from finetune.system.procs import PID_DIR, descendants, free_port, run_guarded, spawn_guarded, stop_group

LOG_NAME = "ollama-serve.log"
# The PyPI build (Intel's fork, see ollama_provision) defaults to 999 "GPU" layers and then builds graphs
# with SYCL-only ops that its CPU backend skips: answers are garbage unless this is 0 (measured).
FORK_ENV = {"OLLAMA_NUM_GPU": "0"}
_ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


class OllamaServerError(RuntimeError):
    """The server did not start, died, or did not become ready in time."""


class PortTaken(OllamaServerError):
    """Another process bound the chosen port first."""


PORT_ATTEMPTS = 3


class OllamaCommandError(RuntimeError):
    """An `ollama` CLI command (e.g. create) failed; the message carries the CLI's own error."""


_LIVE: set[OllamaServer] = set()


@atexit.register
def _stop_all() -> None:
    for server in list(_LIVE):
        server.stop()


def is_provisioned_fork(binary: Path) -> bool:
    return (binary.parent.parent / STAMP_NAME).is_file()


class OllamaServer:
    def __init__(
        self,
        binary: str | Path,
        run_dir: str | Path,
        *,
        port: int | None = None,
        ready_timeout: float = 60.0,
        env_extra: Mapping[str, str] | None = None,
        stop_grace: float = 10.0,
        request_timeout: float = 120.0,
        pid_dir: str | Path | None = None,
    ) -> None:
        self.binary = _absolute_binary(binary)  # the server runs with cwd=run_dir
        self.run_dir = Path(run_dir).absolute()
        self.port = port
        self.ready_timeout = ready_timeout
        self.stop_grace = stop_grace
        self.request_timeout = request_timeout
        self.env_extra = dict(env_extra or {})
        self.log_path = self.run_dir / LOG_NAME
        self.pid_dir = Path(pid_dir) if pid_dir is not None else self.run_dir / PID_DIR
        self.version: str | None = None
        self._proc: subprocess.Popen | None = None
        self._log: Any = None

    # ------------------------------------------------------------ lifecycle

    @property
    def host(self) -> str:
        if self.port is None:
            raise OllamaServerError("server not started: no port yet")
        return f"127.0.0.1:{self.port}"

    @property
    def base_url(self) -> str:
        return f"http://{self.host}"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    @property
    def env(self) -> dict[str, str]:
        env = dict(os.environ)
        if is_provisioned_fork(self.binary):
            env.update(FORK_ENV)
        env.update(
            OLLAMA_HOST=self.host,
            OLLAMA_MODELS=str((self.run_dir / "models").resolve()),
            HOME=str((self.run_dir / "home").resolve()),
        )
        env.update(self.env_extra)
        return env

    def start(self) -> OllamaServer:
        if self._proc is not None:
            raise OllamaServerError(f"server already running (pid {self._proc.pid})")
        for sub in ("models", "home"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        for attempt in range(PORT_ATTEMPTS):
            if self.port is None:
                self.port = free_port()
            try:
                self._spawn()
                self.version = self._wait_ready()
                return self
            except PortTaken as exc:
                self.stop()
                if attempt == PORT_ATTEMPTS - 1:
                    raise OllamaServerError(f"{exc} (tried {PORT_ATTEMPTS} ports)") from None
                self.port = None  # someone took the port between choosing and binding: pick another
            except BaseException:
                self.stop()
                raise
        raise AssertionError("unreachable")

    def _spawn(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - closed in stop()
        self._log_start = self._log.tell()
        try:
            self._proc = spawn_guarded(
                [str(self.binary), "serve"],
                pid_dir=self.pid_dir,
                name="ollama-serve",
                stdin=subprocess.DEVNULL,
                stdout=self._log,
                stderr=subprocess.STDOUT,
                env=self.env,
                cwd=self.run_dir,
            )
        except OSError as exc:
            self._log.close()
            self._log = None
            raise OllamaServerError(f"cannot run {self.binary} serve: {exc}") from exc
        _LIVE.add(self)

    def _wait_ready(self) -> str:
        deadline = time.monotonic() + self.ready_timeout
        assert self._proc is not None
        while True:
            code = self._proc.poll()
            if code is not None:
                tail = self.log_tail()
                if "address already in use" in self._log_since_start().lower():
                    raise PortTaken(f"port {self.port} is taken: {self.binary} serve could not bind it")
                raise OllamaServerError(
                    f"{self.binary} serve exited with code {code} before it was ready; "
                    f"end of {self.log_path}:\n{tail}"
                )
            version = self._probe_version()
            if version is not None and self._proc.poll() is None and self._listening():
                return version
            if time.monotonic() > deadline:
                raise OllamaServerError(
                    f"{self.binary} serve did not answer {self.base_url}/api/version within "
                    f"{self.ready_timeout:g} s; end of {self.log_path}:\n{self.log_tail()}"
                )
            time.sleep(0.1)

    def _listening(self) -> bool:
        """Our server (not another one that holds the port and answered the probe) listens on the port."""
        assert self._proc is not None
        for pid in (self._proc.pid, *descendants(self._proc.pid)):
            with contextlib.suppress(psutil.Error):
                for conn in psutil.Process(pid).net_connections(kind="tcp"):
                    if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == self.port:
                        return True
        return False

    def _log_since_start(self) -> str:
        try:
            with open(self.log_path, "rb") as fh:
                fh.seek(getattr(self, "_log_start", 0))
                return fh.read().decode(errors="replace")
        except OSError:
            return ""

    def _probe_version(self) -> str | None:
        try:
            with urllib.request.urlopen(f"{self.base_url}/api/version", timeout=2) as resp:
                return str(json.loads(resp.read())["version"])
        except (OSError, ValueError, KeyError, TypeError, urllib.error.URLError):
            return None

    def stop(self) -> None:
        """Terminate the server and everything it started; kill what is left after stop_grace."""
        proc, self._proc = self._proc, None
        _LIVE.discard(self)
        try:
            if proc is not None:
                stop_group(proc, grace=self.stop_grace)
        finally:
            if self._log is not None:
                self._log.close()
                self._log = None

    def __enter__(self) -> OllamaServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def log_tail(self, lines: int = 30) -> str:
        try:
            text = self.log_path.read_text(errors="replace")
        except OSError:
            return "(no log)"
        return "\n".join(text.splitlines()[-lines:])

    # ------------------------------------------------------------ API helpers

    def client(self, timeout: float | None = None) -> Any:
        import ollama

        return ollama.Client(host=self.base_url, timeout=timeout or self.request_timeout)

    def cli(self, args: Sequence[str], *, timeout: float = 600.0) -> subprocess.CompletedProcess:
        """Run `ollama ARGS` against this server; output has the CLI's spinner escapes removed."""
        cmd = [str(self.binary), *args]
        proc = run_guarded(cmd, timeout=timeout, env=self.env, cwd=self.run_dir, name="ollama-cli")
        proc.stdout, proc.stderr = _clean(proc.stdout), _clean(proc.stderr)
        return proc

    def create_model(
        self, name: str, modelfile_path: str | Path, *, timeout: float = 600.0, quantize: str | None = None
    ) -> str:
        """`ollama create NAME -f Modelfile [--quantize TYPE]` (the Python client's create() gets a 400 from
        0.5.4); quantize: llama.cpp's quantizer inside Ollama, from an f16/f32 GGUF."""
        path = Path(modelfile_path).absolute()  # the CLI runs in the server's folder, not the caller's cwd
        if not path.is_file():
            raise OllamaCommandError(f"no Modelfile at {path}")
        args = ["create", name, "-f", str(path), *(["--quantize", quantize] if quantize else [])]
        what = "ollama " + " ".join(args)
        try:
            proc = self.cli(args, timeout=timeout)
        except subprocess.TimeoutExpired as exc:
            raise OllamaCommandError(f"{what} took over {timeout:g} s") from exc
        if proc.returncode != 0:
            errors = [ln for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.startswith("Error")]
            message = "\n".join(errors) or (proc.stderr or proc.stdout).strip()[-2000:]
            raise OllamaCommandError(f"{what} failed ({proc.returncode}): {message}")
        return proc.stdout + proc.stderr

    def delete_model(self, name: str) -> None:
        self.client().delete(name)

    def list_models(self) -> list[str]:
        return [m["model"] for m in self.client().list()["models"]]

    def show(self, name: str) -> Any:
        return self.client().show(name)

    def __repr__(self) -> str:
        state = f"pid {self._proc.pid}" if self._proc else "stopped"
        return f"OllamaServer({self.binary}, port={self.port}, {state})"


def _absolute_binary(binary: str | Path) -> Path:
    text = str(binary)
    if os.sep not in text:
        found = shutil.which(text)
        return Path(found) if found else Path(text)
    return Path(os.path.abspath(text))


def _clean(text: str) -> str:
    text = _ANSI.sub("", text or "")
    return "\n".join(ln.split("\r")[-1] for ln in text.splitlines())
