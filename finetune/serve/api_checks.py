"""Exercise a served model's API: determinism, streaming, concurrency and error handling.

`served_checks` takes an ollama.Client-like object, and every request runs under a deadline so that a stuck
server fails a check instead of hanging the pipeline. The checks deploy makes (finetune.serve.deploy) share
the Check type and response_field.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

UNKNOWN_MODEL = "finetune-no-such-model"
# This server rejects a mistyped option with 500 'option "temperature" must be of type float32'
# (measured on 0.5.4); an unknown option name is only logged and ignored.
BAD_OPTIONS: dict[str, Any] = {"temperature": "hot"}


@dataclass(frozen=True)
class Check:
    name: str
    passed: bool
    detail: str


def response_field(obj: Any, key: str) -> Any:
    """A field of an ollama response model or of a plain dict (test fakes)."""
    if isinstance(obj, Mapping):
        return obj.get(key)
    try:
        return obj[key]
    except (KeyError, TypeError, IndexError):
        return getattr(obj, key, None)


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
    text = response_field(response, "response")
    if not isinstance(text, str) or not text.strip():
        return Check("generate", False, f"empty answer: {text!r}")
    if response_field(response, "done") is not True:
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
        detail = f"{why}; {len(got)} chunk(s) so far, done={[response_field(c, 'done') for _, c in got][-3:]}"
        return [Check("stream_matches", False, detail), Check("stream_chunks", False, detail)]
    expected = response_field(single, "response") or ""
    streamed = "".join(response_field(c, "response") or "" for _, c in got)
    if streamed == expected:
        match = Check("stream_matches", True, f"streamed == non-streamed ({len(expected)} chars)")
    else:
        match = Check(
            "stream_matches", False, f"streamed {streamed[:120]!r} != non-streamed {expected[:120]!r}"
        )
    return [match, _check_chunks(got)]


def _check_chunks(got: list[tuple[float, Any]]) -> Check:
    dones = [response_field(c, "done") is True for _, c in got]
    if not got:
        return Check("stream_chunks", False, "the stream yielded nothing")
    if any(dones[:-1]):
        return Check(
            "stream_chunks", False, f"done=True before the end (chunk {dones.index(True) + 1} of {len(got)})"
        )
    if not dones[-1]:
        return Check("stream_chunks", False, f"{len(got)} chunk(s) and none ended with done=True")
    pieces = sum(1 for _, c in got if response_field(c, "response"))
    generated = response_field(got[-1][1], "eval_count")
    # eval_count includes the end-of-generation token when done_reason is "stop" (Ollama's runner counts it
    # before it stops); a one-token answer streams as one piece
    text_tokens = (
        None if generated is None else generated - (response_field(got[-1][1], "done_reason") == "stop")
    )
    needed = 2 if text_tokens is None or text_tokens >= 2 else 1
    if pieces < needed:
        detail = f"{pieces} text chunk(s) for {text_tokens} answer tokens: the answer did not arrive piece by piece"
        return Check("stream_chunks", False, detail)
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
        elif (
            response_field(value, "done") is not True or not (response_field(value, "response") or "").strip()
        ):
            problems.append(f"#{i} incomplete answer")
    if problems:
        return Check("concurrent", False, "; ".join(problems))
    times = ", ".join(f"{r[2]:.2f}" for r in results)
    answers = [response_field(r[1], "response") for r in results]
    if len(set(answers)) != 1:  # temperature 0, same prompt: a server that answers differently is broken
        differ = f"gave {len(set(answers))} different answers: {[a[:40] for a in answers]}"
        return Check("concurrent", False, f"{n} concurrent requests at temperature 0 {differ}")
    return Check("concurrent", True, f"{n} concurrent requests completed in {times} s with identical answers")


def _expect_refusal(
    check: str, asked: str, ask: Callable[[], Any], timeout: float, status: int | None
) -> Check:
    """A request the server must refuse with an HTTP error (`status`, or any when None), promptly."""
    state, value = _with_deadline(ask, timeout)
    if state == "timeout":
        return Check(check, False, f"no answer within {timeout:g} s for {asked}")
    if state == "ok":
        return Check(check, False, f"{asked} was answered: {response_field(value, 'response')!r}")
    code = getattr(value, "status_code", None)
    if code is None or (status is not None and code != status):
        return Check(
            check, False, f"expected {f'a {status}' if status else 'a server'} error, got {_describe(value)}"
        )
    return Check(check, True, f"{asked} refused: {_describe(value)}")


def _check_unknown_model(client: Any, model: str, prompt: str, timeout: float) -> Check:
    def ask() -> Any:
        return client.generate(model=model, prompt=prompt, options={"num_predict": 1})

    return _expect_refusal("unknown_model", f"unknown model {model!r}", ask, timeout, status=404)


def _check_bad_options(client: Any, name: str, prompt: str, timeout: float, options: dict[str, Any]) -> Check:
    def ask() -> Any:
        return client.generate(model=name, prompt=prompt, options={**options, "num_predict": 1})

    return _expect_refusal("bad_options", f"options {options}", ask, timeout, status=None)


def _not_run(name: str) -> Check:
    return Check(name, False, "not run")
