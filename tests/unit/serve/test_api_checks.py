"""The served-model API checks: each fails on its broken fake client and passes on a healthy one."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import ollama
import pytest

from finetune.serve.api_checks import (
    BAD_OPTIONS,
    UNKNOWN_MODEL,
    Check,
    _check_chunks,
    response_field,
    served_checks,
)
from tests.conftest import SERVED_CHECK_NAMES


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


class FakeClient:
    """Behaves like ollama.Client.generate for one model; subclasses break one behaviour each."""

    answer = "The capital of France is Paris."

    def __init__(self, model: str = "ft") -> None:
        self.model = model
        self.calls = 0

    def generate(self, model: str, prompt: str, options: dict | None = None, stream: bool = False, **kw):
        self.calls += 1
        if model != self.model:
            raise ollama.ResponseError(f"model '{model}' not found", 404)
        if options and not isinstance(options.get("temperature", 0), int | float):
            raise ollama.ResponseError('option "temperature" must be of type float32', 500)
        return self.stream() if stream else {"response": self.answer, "done": True}

    def stream(self) -> Iterator[dict]:
        words = self.answer.split(" ")
        for i, word in enumerate(words):
            yield {"response": word if i == 0 else " " + word, "done": False}
        yield {"response": "", "done": True}


class StreamDiffers(FakeClient):
    def stream(self):
        yield {"response": "The capital of France", "done": False}
        yield {"response": " is Lyon.", "done": False}
        yield {"response": "", "done": True}


class NeverDone(FakeClient):
    def stream(self):
        for chunk in super().stream():
            if not chunk["done"]:
                yield chunk


class DoneTooEarly(FakeClient):
    def stream(self):
        yield {"response": "The capital", "done": True}
        yield {"response": " of France is Paris.", "done": False}


class OneChunk(FakeClient):
    def stream(self):
        yield {"response": self.answer, "done": True}


class StreamHangs(FakeClient):
    def stream(self):
        yield {"response": "The", "done": False}
        time.sleep(30)


class Serialises(FakeClient):
    """Deadlocks once two requests are in flight, like a server that cannot queue."""

    def __init__(self) -> None:
        super().__init__()
        self.lock = threading.Lock()

    def generate(self, model, prompt, options=None, stream=False, **kw):
        if model == self.model and not stream and self.calls >= 2:
            if not self.lock.acquire(timeout=0.05):
                time.sleep(30)
            time.sleep(0.2)
            self.lock.release()
        return super().generate(model, prompt, options, stream, **kw)


class DiffersUnderLoad(FakeClient):
    """Answers differently while another request is in flight, like a server whose batching changes logits."""

    def __init__(self) -> None:
        super().__init__()
        self.lock, self.in_flight = threading.Lock(), 0

    def generate(self, model, prompt, options=None, stream=False, **kw):
        if stream or model != self.model:
            return super().generate(model, prompt, options, stream, **kw)
        with self.lock:
            self.in_flight += 1
            crowded = self.in_flight > 1
        time.sleep(0.2)
        with self.lock:
            self.in_flight -= 1
        answer = "The capital of France is Lyon." if crowded else self.answer
        return {**super().generate(model, prompt, options, stream, **kw), "response": answer}


class AnswersAnyModel(FakeClient):
    def generate(self, model, prompt, options=None, stream=False, **kw):
        return super().generate(self.model, prompt, options, stream, **kw)


class UnknownModelHangs(FakeClient):
    def generate(self, model, prompt, options=None, stream=False, **kw):
        if model != self.model:
            time.sleep(30)
        return super().generate(model, prompt, options, stream, **kw)


class UnknownModelWrongError(FakeClient):
    def generate(self, model, prompt, options=None, stream=False, **kw):
        if model != self.model:
            raise ConnectionError("connection reset")
        return super().generate(model, prompt, options, stream, **kw)


class AcceptsBadOptions(FakeClient):
    def generate(self, model, prompt, options=None, stream=False, **kw):
        return super().generate(model, prompt, {**(options or {}), "temperature": 0}, stream, **kw)


class EmptyAnswer(FakeClient):
    answer = ""


def _run(client: FakeClient, timeout: float = 2.0) -> dict[str, Check]:
    return _by_name(served_checks(client, "ft", "What is the capital of France?", timeout=timeout))


def test_healthy_client_passes_every_check() -> None:
    checks = _run(FakeClient())
    assert list(checks) == list(SERVED_CHECK_NAMES)
    assert all(c.passed for c in checks.values()), checks
    assert "404" in checks["unknown_model"].detail and "float32" in checks["bad_options"].detail


# (broken client, the check that must fail, words in its detail, other checks that may fail with it)
BROKEN = [
    (StreamDiffers(), "stream_matches", "Lyon", ()),
    (NeverDone(), "stream_chunks", "none ended with done=True", ()),
    (DoneTooEarly(), "stream_chunks", "done=True before the end (chunk 1 of 2)", ()),
    (OneChunk(), "stream_chunks", "did not arrive piece by piece", ()),
    (StreamHangs(), "stream_chunks", "stream unfinished after 0.5 s; 1 chunk(s)", ("stream_matches",)),
    (Serialises(), "concurrent", "no answer within 0.5 s", ()),
    (DiffersUnderLoad(), "concurrent", "gave 2 different answers", ()),
    (AnswersAnyModel(), "unknown_model", "answered", ()),
    (UnknownModelHangs(), "unknown_model", "no answer within 0.5 s", ()),
    (UnknownModelWrongError(), "unknown_model", "expected a 404 error, got ConnectionError", ()),
    (AcceptsBadOptions(), "bad_options", "was answered", ()),
    (EmptyAnswer(), "generate", "empty answer", ("stream_chunks", "concurrent")),
]


@pytest.mark.parametrize(
    ("client", "failing", "message", "also"), BROKEN, ids=[type(b[0]).__name__ for b in BROKEN]
)
def test_each_check_fails_on_its_broken_client(
    client: FakeClient, failing: str, message: str, also: tuple
) -> None:
    start = time.monotonic()
    checks = _run(client, timeout=0.5)
    assert time.monotonic() - start < 10, "a hung request must not hang the checks"
    assert not checks[failing].passed and message in checks[failing].detail, checks[failing]
    others = [c for name, c in checks.items() if name != failing and name not in also]
    assert all(c.passed for c in others), others  # the broken behaviour is what gets blamed


def test_concurrent_answers_that_differ_fail_the_check() -> None:
    from finetune.gates.served import served_api

    checks = served_checks(DiffersUnderLoad(), "ft", "What is the capital of France?", timeout=2.0)
    concurrent = _by_name(checks)["concurrent"]
    assert not concurrent.passed and "Lyon" in concurrent.detail and "Paris" in concurrent.detail
    v = served_api(checks)
    assert not v.passed and "concurrent:" in v.detail


def test_concurrency_sends_the_requested_number_of_requests() -> None:
    client = FakeClient()
    served_checks(client, "ft", "hi", timeout=2.0, concurrency=5)
    # warm-up, non-streamed, streamed, 5 concurrent, unknown model, bad options
    assert client.calls == 1 + 1 + 1 + 5 + 1 + 1


def test_unreachable_model_fails_everything_quickly() -> None:
    checks = served_checks(FakeClient(model="other"), "ft", "hi", timeout=0.5)
    assert [c.passed for c in checks] == [False] * 6
    assert "404" in checks[0].detail and checks[1].detail == "not run: generate failed"


def test_bad_options_default_is_what_the_server_rejects() -> None:
    assert not isinstance(BAD_OPTIONS["temperature"], int | float)
    assert UNKNOWN_MODEL != "ft"


ONE_TOKEN_CASES = [(2, "stop", True), (1, "length", True), (3, "stop", False), (2, "length", False)]


@pytest.mark.parametrize(("eval_count", "done_reason", "passed"), ONE_TOKEN_CASES)
def test_a_one_token_answer_may_stream_as_one_chunk_and_the_end_token_is_not_counted(
    eval_count, done_reason, passed
):
    # Ollama's eval_count includes the end-of-generation token when it stopped on it
    chunk = {"response": "Yes", "done": True, "eval_count": eval_count, "done_reason": done_reason}
    check = _check_chunks([(0.0, chunk)])
    assert check.passed is passed, check.detail


class Model:
    """An ollama response model: fields by attribute and by subscript."""

    response = "Paris"

    def __getitem__(self, key):
        return getattr(self, key)


def test_response_field_reads_dicts_response_models_and_plain_objects() -> None:
    assert response_field({"response": "Paris"}, "response") == "Paris"
    assert response_field({}, "response") is None
    assert response_field(Model(), "response") == "Paris"
    assert response_field(object(), "response") is None
