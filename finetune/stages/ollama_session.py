"""One Ollama server per run, started on first use and always stopped by the tier's ExitStack."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any

from finetune.stages.context import Deps


class OllamaSession:
    def __init__(self, deps: Deps, folder: Path, stack: contextlib.ExitStack):
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
