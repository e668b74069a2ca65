"""Deploy a GGUF to Ollama and check that the served model behaves: the tier 3 gate's Ollama half.

`deploy` writes the Modelfile, creates the model and verifies what the server reports back.
`served_checks` exercises the API: determinism, streaming, concurrency and error handling. Both take
their collaborators as arguments (an OllamaServer-like object, an ollama.Client-like object), and every
request runs under a deadline so that a stuck server fails a check instead of hanging the pipeline.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from finetune.serve.modelfile import parse_modelfile
from finetune.system.atomic import atomic_write_text

MODELFILE_NAME = "Modelfile"
UNKNOWN_MODEL = "finetune-no-such-model"
# This server rejects a mistyped option with 500 'option "temperature" must be of type float32'
# (measured on 0.5.4); an unknown option name is only logged and ignored.
BAD_OPTIONS: dict[str, Any] = {"temperature": "hot"}


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


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
    template = _get(shown, "template") or ""
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
    served = shown_parameters(_get(shown, "parameters") or "").get("stop", [])
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


def _get(obj: Any, key: str) -> Any:
    """A field of an ollama response model or of a plain dict (test fakes)."""
    if isinstance(obj, Mapping):
        return obj.get(key)
    try:
        return obj[key]
    except (KeyError, TypeError, IndexError):
        return getattr(obj, key, None)


# ---------------------------------------------------------------- served checks


def _with_deadline(fn: Callable[[], Any], timeout: float) -> tuple[str, Any]:
    """("ok", value), ("error", exception) or ("timeout", None). A daemon thread, so a hung call
    cannot keep the process alive."""
    box: dict[str, Any] = {}

    def run() -> None:
        try:
            box["value"] = fn()
        except BaseException as exc:
            box["error"] = exc

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        return "timeout", None
    return ("error", box["error"]) if "error" in box else ("ok", box.get("value"))


def _describe(exc: BaseException) -> str:
    status = getattr(exc, "status_code", None)
    return f"{type(exc).__name__}" + (f" {status}" if status is not None else "") + f": {exc}"


def served_checks(
    client: Any,
    name: str,
    prompt: str,
    *,
    timeout: float = 60.0,
    concurrency: int = 3,
    num_predict: int = 16,
    seed: int = 0,
    unknown_model: str = UNKNOWN_MODEL,
    bad_options: Mapping[str, Any] | None = None,
) -> list[Check]:
    """Exercise a served model; every request is bounded by `timeout` seconds."""
    options = {"temperature": 0, "seed": seed, "num_predict": num_predict}

    def generate(**kw: Any) -> Any:
        return client.generate(model=name, prompt=prompt, options=options, **kw)

    # The first request after a load evaluates the prompt with an empty cache; later ones reuse it and,
    # measured at temperature 0, may continue differently. Warm up so the comparisons below are fair.
    state, warm = _with_deadline(lambda: generate(stream=False), timeout)
    if state != "ok":
        why = f"no answer within {timeout:g} s" if state == "timeout" else _describe(warm)
        checks = [Check("generate", False, why)]
        return checks + [Check(n, False, "not run: generate failed") for n in _DEPENDENT]
    checks = [_check_answer(warm)]
    checks += _check_streaming(generate, timeout)
    checks.append(_check_concurrent(generate, timeout, concurrency))
    checks.append(_check_unknown_model(client, unknown_model, prompt, timeout))
    checks.append(_check_bad_options(client, name, prompt, timeout, dict(bad_options or BAD_OPTIONS)))
    return checks


_DEPENDENT = ("stream_matches", "stream_chunks", "concurrent", "unknown_model", "bad_options")


def _check_answer(response: Any) -> Check:
    text = _get(response, "response")
    if not isinstance(text, str) or not text.strip():
        return Check("generate", False, f"empty answer: {text!r}")
    if _get(response, "done") is not True:
        return Check("generate", False, "the answer did not say done=True")
    return Check("generate", True, f"answer {text[:80]!r}")


def _check_streaming(generate: Callable[..., Any], timeout: float) -> list[Check]:
    state, single = _with_deadline(lambda: generate(stream=False), timeout)
    if state != "ok":
        why = f"no answer within {timeout:g} s" if state == "timeout" else _describe(single)
        return [Check("stream_matches", False, f"non-streamed request: {why}"), _not_run("stream_chunks")]
    chunks: list[tuple[float, Any]] = []

    def consume() -> None:
        for chunk in generate(stream=True):
            chunks.append((time.monotonic(), chunk))

    state, err = _with_deadline(consume, timeout)
    got = list(chunks)
    if state != "ok":
        why = f"stream unfinished after {timeout:g} s" if state == "timeout" else _describe(err)
        detail = f"{why}; {len(got)} chunk(s) so far, done={[_get(c, 'done') for _, c in got][-3:]}"
        return [Check("stream_matches", False, detail), Check("stream_chunks", False, detail)]
    expected = _get(single, "response") or ""
    streamed = "".join(_get(c, "response") or "" for _, c in got)
    if streamed == expected:
        match = Check("stream_matches", True, f"streamed == non-streamed ({len(expected)} chars)")
    else:
        match = Check(
            "stream_matches", False, f"streamed {streamed[:120]!r} != non-streamed {expected[:120]!r}"
        )
    return [match, _check_chunks(got)]


def _check_chunks(got: list[tuple[float, Any]]) -> Check:
    dones = [_get(c, "done") is True for _, c in got]
    if not got:
        return Check("stream_chunks", False, "the stream yielded nothing")
    if any(dones[:-1]):
        return Check(
            "stream_chunks", False, f"done=True before the end (chunk {dones.index(True) + 1} of {len(got)})"
        )
    if not dones[-1]:
        return Check("stream_chunks", False, f"{len(got)} chunk(s) and none ended with done=True")
    pieces = sum(1 for _, c in got if _get(c, "response"))
    generated = _get(got[-1][1], "eval_count")
    # eval_count includes the end-of-generation token when done_reason is "stop" (Ollama's runner counts it
    # before it stops); a one-token answer streams as one piece
    text_tokens = None if generated is None else generated - (_get(got[-1][1], "done_reason") == "stop")
    needed = 2 if text_tokens is None or text_tokens >= 2 else 1
    if pieces < needed:
        return Check(
            "stream_chunks", False,
            f"{pieces} text chunk(s) for {text_tokens} answer tokens: the answer did not arrive piece by piece",
        )  # fmt: skip
    spread = got[-1][0] - got[0][0]
    return Check("stream_chunks", True, f"{pieces} text chunks over {spread:.2f} s, last done=True")


def _check_concurrent(generate: Callable[..., Any], timeout: float, n: int) -> Check:
    results: list[tuple[str, Any, float]] = [("timeout", None, 0.0)] * n

    def one(i: int) -> None:
        t = time.monotonic()
        state, value = _with_deadline(lambda: generate(stream=False), timeout)
        results[i] = (state, value, time.monotonic() - t)

    threads = [threading.Thread(target=one, args=(i,), daemon=True) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout + 5)
    problems = []
    for i, (state, value, _) in enumerate(results):
        if state == "timeout":
            problems.append(f"#{i} no answer within {timeout:g} s")
        elif state == "error":
            problems.append(f"#{i} {_describe(value)}")
        elif _get(value, "done") is not True or not (_get(value, "response") or "").strip():
            problems.append(f"#{i} incomplete answer")
    if problems:
        return Check("concurrent", False, "; ".join(problems))
    times = ", ".join(f"{r[2]:.2f}" for r in results)
    answers = [_get(r[1], "response") for r in results]
    if len(set(answers)) != 1:  # temperature 0, same prompt: a server that answers differently is broken
        return Check("concurrent", False, f"{n} concurrent requests at temperature 0 gave {len(set(answers))} "
                                          f"different answers: {[a[:40] for a in answers]}")  # fmt: skip
    return Check("concurrent", True, f"{n} concurrent requests completed in {times} s with identical answers")


def _check_unknown_model(client: Any, model: str, prompt: str, timeout: float) -> Check:
    def ask() -> Any:
        return client.generate(model=model, prompt=prompt, options={"num_predict": 1})

    state, value = _with_deadline(ask, timeout)
    if state == "timeout":
        return Check("unknown_model", False, f"no answer within {timeout:g} s for unknown model {model!r}")
    if state == "ok":
        return Check("unknown_model", False, f"unknown model {model!r} answered: {_get(value, 'response')!r}")
    if getattr(value, "status_code", None) != 404:
        return Check("unknown_model", False, f"expected a 404 error, got {_describe(value)}")
    return Check("unknown_model", True, _describe(value))


def _check_bad_options(client: Any, name: str, prompt: str, timeout: float, options: dict[str, Any]) -> Check:
    def ask() -> Any:
        return client.generate(model=name, prompt=prompt, options={**options, "num_predict": 1})

    state, value = _with_deadline(ask, timeout)
    if state == "timeout":
        return Check("bad_options", False, f"no answer within {timeout:g} s for options {options}")
    if state == "ok":
        return Check("bad_options", False, f"options {options} were accepted: {_get(value, 'response')!r}")
    if getattr(value, "status_code", None) is None:
        return Check("bad_options", False, f"expected a server error, got {_describe(value)}")
    return Check("bad_options", True, f"options {options} rejected: {_describe(value)}")


def _not_run(name: str) -> Check:
    return Check(name, False, "not run")
