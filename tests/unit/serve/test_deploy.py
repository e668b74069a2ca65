"""Deploy: each check fails on a broken fake host and passes on a healthy one, and on a real server."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from finetune.serve.api_checks import Check, served_checks
from finetune.serve.deploy import deploy, shown_parameters
from finetune.serve.modelfile import chat_format, render_modelfile
from finetune.serve.modelfile_syntax import parse_modelfile
from finetune.serve.ollama_server import OllamaServer
from tests.conftest import RealOllama

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
