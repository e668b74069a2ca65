"""Deploy and served-model checks: each fails on a broken fake and passes on a healthy one (and a real server)."""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import ollama
import pytest

from finetune.serve.deploy import (
    BAD_OPTIONS,
    UNKNOWN_MODEL,
    Check,
    _check_chunks,
    deploy,
    served_checks,
    shown_parameters,
)
from finetune.serve.modelfile import chat_format, parse_modelfile, render_modelfile
from finetune.serve.ollama_server import OllamaServer
from tests.conftest import SERVED_CHECK_NAMES, RealOllama

FMT = chat_format("chatml")


# ---------------------------------------------------------------- deploy with a fake host


class FakeHost:
    """Stores what `create` got and reports it back the way Ollama's show/list do."""

    def __init__(
        self, *, fail_create: str | None = None, drop_stop: bool = False, other_template: bool = False
    ):
        self.fail_create, self.drop_stop, self.other_template = fail_create, drop_stop, other_template
        self.models: dict[str, str] = {}
        self.listed = True

    def create_model(self, name: str, modelfile_path: Path) -> str:
        if self.fail_create:
            raise RuntimeError(self.fail_create)
        self.models[name] = Path(modelfile_path).read_text()
        return "success"

    def show(self, name: str) -> dict[str, Any]:
        parsed = parse_modelfile(self.models[name])
        template = next(v for c, v in parsed if c == "TEMPLATE")
        stops = [v.split(" ", 1)[1] for c, v in parsed if c == "PARAMETER" and v.startswith("stop ")]
        if self.drop_stop:
            stops = stops[:-1]
        lines = [f'stop                           "{s}"' for s in stops] + [
            "temperature                    0"
        ]
        return {
            "template": "{{ .Prompt }}" if self.other_template else template,
            "parameters": "\n".join(lines),
        }

    def list_models(self) -> list[str]:
        return [f"{n}:latest" for n in self.models] if self.listed else []


def _modelfile(gguf: Path) -> str:
    return render_modelfile(gguf, template=FMT.template, stop=FMT.stop, parameters={"temperature": 0})


@pytest.fixture
def gguf(tmp_path: Path) -> Path:
    path = tmp_path / "model.gguf"
    path.write_bytes(b"GGUF")
    return path


def _by_name(checks: list[Check]) -> dict[str, Check]:
    return {c.name: c for c in checks}


def test_deploy_passes_and_writes_the_modelfile(tmp_path: Path, gguf: Path) -> None:
    host = FakeHost()
    text = _modelfile(gguf)
    result = deploy(host, "ft", gguf, text, tmp_path / "run")
    assert result.passed, result.checks
    assert [c.name for c in result.checks] == ["modelfile", "create", "show_template", "show_stop", "listed"]
    assert (tmp_path / "run" / "Modelfile").read_text() == text == host.models["ft"]
    assert result.to_dict()["passed"] is True
    assert list((tmp_path / "run").iterdir()) == [tmp_path / "run" / "Modelfile"]  # no temp files left


@pytest.mark.parametrize(
    ("host", "failing", "message"),
    [
        (FakeHost(fail_create="Error: unknown parameter 'temprature'"), "create", "temprature"),
        (FakeHost(other_template=True), "show_template", "not the Modelfile's"),
        (FakeHost(drop_stop=True), "show_stop", "lacks stop strings ['<|im_start|>']"),
    ],
)
def test_deploy_fails_when_the_server_disagrees(
    tmp_path: Path, gguf: Path, host: FakeHost, failing: str, message: str
) -> None:
    result = deploy(host, "ft", gguf, _modelfile(gguf), tmp_path)
    assert not result.passed
    check = _by_name(result.checks)[failing]
    assert not check.passed and message in check.detail


def test_deploy_fails_when_the_model_is_not_listed(tmp_path: Path, gguf: Path) -> None:
    host = FakeHost()
    host.listed = False
    check = _by_name(deploy(host, "ft", gguf, _modelfile(gguf), tmp_path).checks)["listed"]
    assert not check.passed and "not in the server's list" in check.detail


def test_deploy_refuses_a_modelfile_for_another_gguf_or_a_missing_one(tmp_path: Path, gguf: Path) -> None:
    other = tmp_path / "other.gguf"
    other.write_bytes(b"GGUF")
    host = FakeHost()
    result = deploy(host, "ft", gguf, _modelfile(other), tmp_path / "run")
    assert not result.passed and "is not the GGUF" in result.checks[0].detail
    assert host.models == {} and not (tmp_path / "run" / "Modelfile").exists()
    missing = deploy(host, "ft", tmp_path / "gone.gguf", _modelfile(tmp_path / "gone.gguf"), tmp_path / "run")
    assert "no GGUF file" in missing.checks[0].detail


def test_deploy_resolves_a_relative_from_against_run_dir(tmp_path: Path) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "m.gguf").write_bytes(b"GGUF")
    text = f'FROM ./m.gguf\nTEMPLATE """{FMT.template}"""\nPARAMETER stop "<|im_end|>"\n'
    assert deploy(FakeHost(), "ft", run / "m.gguf", text, run).passed


def test_deploy_fails_on_a_modelfile_it_cannot_parse_or_with_two_froms(tmp_path: Path, gguf: Path) -> None:
    host = FakeHost()
    result = deploy(host, "ft", gguf, 'FROM x\nTEMPLATE """never closed\n', tmp_path / "run")
    assert (
        not result.passed
        and result.checks[0].name == "modelfile"
        and "cannot parse" in result.checks[0].detail
    )
    two = _modelfile(gguf) + f"FROM {gguf}\n"
    result = deploy(host, "ft", gguf, two, tmp_path / "run")
    assert not result.passed and "exactly one FROM line, found 2" in result.checks[0].detail
    assert host.models == {}


def test_deploy_fails_when_the_modelfile_sets_no_stop_strings(tmp_path: Path, gguf: Path) -> None:
    text = render_modelfile(gguf, template=FMT.template, stop=[], parameters={})
    check = _by_name(deploy(FakeHost(), "ft", gguf, text, tmp_path).checks)["show_stop"]
    assert not check.passed and "sets no stop strings" in check.detail


def test_deploy_reports_a_show_that_fails(tmp_path: Path, gguf: Path) -> None:
    class ShowFails(FakeHost):
        def show(self, name):
            raise ConnectionError("server went away")

    result = deploy(ShowFails(), "ft", gguf, _modelfile(gguf), tmp_path)
    assert [c.name for c in result.checks] == ["modelfile", "create", "show"]
    assert not result.passed and "ConnectionError: server went away" in result.checks[-1].detail


def test_deploy_writes_the_modelfile_through_the_given_writer(tmp_path: Path, gguf: Path) -> None:
    written = []

    def write(path: Path, text: str) -> None:
        written.append(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)

    assert deploy(FakeHost(), "ft", gguf, _modelfile(gguf), tmp_path / "run", write_text=write).passed
    assert written == [tmp_path / "run" / "Modelfile"]


def test_shown_parameters_parses_ollama_show_text() -> None:
    text = (
        'num_thread                     1\nstop                           "<|im_end|>"\nstop    "a \\"b\\""\n'
    )
    assert shown_parameters(text) == {"num_thread": ["1"], "stop": ["<|im_end|>", 'a "b"']}


# ---------------------------------------------------------------- served checks with fake clients


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
    (AcceptsBadOptions(), "bad_options", "were accepted", ()),
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


# ---------------------------------------------------------------- real server


def test_real_server_deploy_and_served_checks(real_ollama: RealOllama, tmp_path: Path) -> None:
    gguf = real_ollama.gguf
    with OllamaServer(real_ollama.binary, tmp_path / "run") as server:
        result = deploy(server, "ft-smol", gguf, _modelfile(gguf), tmp_path / "run")
        assert result.passed, result.checks
        checks = served_checks(
            server.client(timeout=60), "ft-smol", "What is the capital of France?", timeout=60
        )
        assert all(c.passed for c in checks), checks


@pytest.mark.parametrize(("eval_count", "done_reason", "passed"), [(2, "stop", True), (1, "length", True),
                                                                   (3, "stop", False), (2, "length", False)])  # fmt: skip
def test_a_one_token_answer_may_stream_as_one_chunk_and_the_end_token_is_not_counted(eval_count, done_reason,
                                                                                     passed):  # fmt: skip
    # Ollama's eval_count includes the end-of-generation token when it stopped on it
    chunk = {"response": "Yes", "done": True, "eval_count": eval_count, "done_reason": done_reason}
    check = _check_chunks([(0.0, chunk)])
    assert check.passed is passed, check.detail
