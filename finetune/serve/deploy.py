"""Deploy a GGUF to Ollama and check the server reports back what was deployed: tier 3's Ollama half.

`deploy` writes the Modelfile, creates the model and verifies show (template, stop strings) and list; it
takes its server as an argument (an OllamaServer-like object). Exercising the served model's API is
finetune.serve.api_checks (`served_checks`, re-exported here with Check for the pipeline's callers).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from finetune.serve.api_checks import Check, response_field
from finetune.serve.api_checks import served_checks as served_checks
from finetune.serve.modelfile_syntax import parse_modelfile
from finetune.system.atomic import atomic_write_text

MODELFILE_NAME = "Modelfile"


@dataclass
class DeployResult:
    name: str
    modelfile_path: Path
    checks: list[Check] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def passed(self) -> bool:
        return bool(self.checks) and all(c.passed for c in self.checks)

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "modelfile": str(self.modelfile_path),
            "passed": self.passed,
            "seconds": round(self.seconds, 3),
            "checks": [asdict(c) for c in self.checks],
        }


class ModelHost(Protocol):
    def create_model(self, name: str, modelfile_path: str | Path) -> Any: ...
    def show(self, name: str) -> Any: ...
    def list_models(self) -> list[str]: ...


# ---------------------------------------------------------------- deploy


def deploy(
    server: ModelHost,
    name: str,
    gguf_path: str | Path,
    modelfile_text: str,
    run_dir: str | Path,
    *,
    write_text: Callable[[Path, str], Any] = atomic_write_text,
) -> DeployResult:
    """Write run_dir/Modelfile, create `name`, and check show (template, stops) and list."""
    start = time.monotonic()
    path = Path(run_dir) / MODELFILE_NAME
    result = DeployResult(name, path)
    checks = result.checks
    try:
        directives = parse_modelfile(modelfile_text)
    except ValueError as exc:
        checks.append(Check("modelfile", False, f"cannot parse the Modelfile text: {exc}"))
        return _done(result, start)
    checks.append(_check_from(directives, Path(gguf_path), Path(run_dir)))
    if not checks[-1].passed:
        return _done(result, start)
    write_text(path, modelfile_text)
    try:
        server.create_model(name, path)
    except Exception as exc:  # the CLI's own message is the useful part, whatever the type
        checks.append(Check("create", False, f"{type(exc).__name__}: {exc}"))
        return _done(result, start)
    checks.append(Check("create", True, f"created {name} from {path}"))
    try:
        shown = server.show(name)
    except Exception as exc:
        checks.append(Check("show", False, f"show {name} failed: {type(exc).__name__}: {exc}"))
        return _done(result, start)
    checks.append(_check_template(directives, shown))
    checks.append(_check_stops(directives, shown))
    checks.append(_check_listed(server, name))
    return _done(result, start)


def _done(result: DeployResult, start: float) -> DeployResult:
    result.seconds = time.monotonic() - start
    return result


def _values(directives: list[tuple[str, str]], command: str) -> list[str]:
    return [value for cmd, value in directives if cmd == command]


def _check_from(directives: list[tuple[str, str]], gguf: Path, run_dir: Path) -> Check:
    froms = _values(directives, "FROM")
    if len(froms) != 1:
        return Check("modelfile", False, f"expected exactly one FROM line, found {len(froms)}")
    if not gguf.is_file():
        return Check("modelfile", False, f"no GGUF file at {gguf}")
    target = Path(froms[0]).expanduser()
    target = target if target.is_absolute() else run_dir / target  # the CLI resolves against the Modelfile
    if target.resolve() != gguf.resolve():
        return Check("modelfile", False, f"FROM {froms[0]} is not the GGUF {gguf}")
    return Check("modelfile", True, f"FROM {gguf}")


def _check_template(directives: list[tuple[str, str]], shown: Any) -> Check:
    template = response_field(shown, "template") or ""
    expected = _values(directives, "TEMPLATE")
    if expected and template != expected[-1]:
        return Check(
            "show_template", False, f"show returned template {template[:200]!r}, not the Modelfile's"
        )
    if not template.strip():
        return Check("show_template", False, "show returned an empty template")
    return Check("show_template", True, f"template of {len(template)} chars as written")


def _check_stops(directives: list[tuple[str, str]], shown: Any) -> Check:
    expected = [v.split(" ", 1)[1] for v in _values(directives, "PARAMETER") if v.startswith("stop ")]
    served = shown_parameters(response_field(shown, "parameters") or "").get("stop", [])
    missing = [s for s in expected if s not in served]
    if not expected:
        return Check("show_stop", False, "the Modelfile sets no stop strings")
    if missing:
        return Check("show_stop", False, f"show lacks stop strings {missing}; it has {served}")
    return Check("show_stop", True, f"stop strings {served}")


def _check_listed(server: ModelHost, name: str) -> Check:
    try:
        names = server.list_models()
    except Exception as exc:
        return Check("listed", False, f"list failed: {type(exc).__name__}: {exc}")
    wanted = {name, f"{name}:latest"} if ":" not in name else {name}
    if wanted.isdisjoint(names):
        return Check("listed", False, f"{name} is not in the server's list {names}")
    return Check("listed", True, f"{name} listed among {len(names)} model(s)")


def shown_parameters(text: str) -> dict[str, list[str]]:
    """Parse show's `parameters` text ("stop   \"<|im_end|>\"" per line) into name -> values."""
    params: dict[str, list[str]] = {}
    for line in text.splitlines():
        key, _, value = line.strip().partition(" ")
        if not key:
            continue
        value = value.strip()
        if value.startswith('"'):
            try:
                value = json.loads(value)
            except ValueError:
                value = value.strip('"')
        params.setdefault(key, []).append(value)
    return params
