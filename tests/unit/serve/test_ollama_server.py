"""OllamaServer against tiny fake servers (python scripts passed as the binary), plus a real-server run."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest

from finetune.serve.modelfile import chat_format, render_modelfile
from finetune.serve.ollama_provision import STAMP_NAME
from finetune.serve.ollama_server import (
    FORK_ENV,
    LOG_NAME,
    PORT_ATTEMPTS,
    OllamaCommandError,
    OllamaServer,
    OllamaServerError,
    is_provisioned_fork,
)
from finetune.system.procs import PID_DIR
from tests.conftest import RealOllama

# serve: answers /api/version on OLLAMA_HOST, records its environment, and starts a "runner" child in a
# session of its own (as a stray runner would be) whose pid it writes down. create: fails like the CLI.
FAKE_OLLAMA = """
import http.server, json, os, subprocess, sys, time
run = os.getcwd()
cmd = sys.argv[1]
if cmd == "create":
    if "bad" in sys.argv[2]:
        sys.stderr.write("\\x1b[?25lgathering model components \\x1b[?25h\\nError: unknown parameter 'temprature'\\n")
        sys.exit(1)
    if not os.path.isfile(sys.argv[sys.argv.index("-f") + 1]):  # read from the server's folder, as Ollama does
        sys.stderr.write("Error: specified Modelfile wasn't found\\n")
        sys.exit(1)
    print("success")
    sys.exit(0)
assert cmd == "serve", sys.argv
json.dump(dict(os.environ), open(os.path.join(run, "env.json"), "w"))
host, port = os.environ["OLLAMA_HOST"].rsplit(":", 1)

class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        body = json.dumps({"version": "0.0.1-fake"}).encode()
        self.send_response(200 if self.path == "/api/version" else 404)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, *args):
        print("request", self.path, flush=True)

server = http.server.HTTPServer((host, int(port)), Handler)  # a taken port fails here, before any runner
runner = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(600)"], start_new_session=True)
open(os.path.join(run, "runner.pid"), "w").write(str(runner.pid))
print("Listening on", host, port, flush=True)
server.serve_forever()
"""
DIES_AT_ONCE = """
import sys
print("Error: could not create blob directory: permission denied", file=sys.stderr)
sys.exit(3)
"""
PORT_TAKEN = """
import sys
print("Error: listen tcp 127.0.0.1: bind: address already in use", file=sys.stderr)
sys.exit(1)
"""
NEVER_READY = """
import os, signal, time
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # a stuck server: only SIGKILL ends it
open("stuck.pid", "w").write(str(os.getpid()))
print("loading forever", flush=True)
while True:
    time.sleep(1)
"""
# The first `serve` finds its port taken (another process bound it first); later ones serve normally.
TAKEN_ONCE = """
import os, runpy, sys
attempts = os.path.join(os.getcwd(), "attempts")
with open(attempts, "a") as fh:
    fh.write(os.environ["OLLAMA_HOST"] + "\\n")
if len(open(attempts).read().split()) == 1:
    print("Error: listen tcp " + os.environ["OLLAMA_HOST"] + ": bind: address already in use", file=sys.stderr)
    sys.exit(1)
runpy.run_path(os.path.join(os.path.dirname(sys.argv[0]), "fake-ollama"), run_name="__main__")
"""


def _script(folder: Path, name: str, body: str) -> Path:
    path = folder / name
    path.write_text(f"#!{sys.executable}\n" + textwrap.dedent(body))
    path.chmod(0o755)
    return path


def _gone(pid: int) -> bool:
    """Exited (a zombie counts: it runs nothing and init reaps it)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return True
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except (OSError, IndexError):
        return True


def _wait_gone(pid: int, seconds: float = 5.0) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if _gone(pid):
            return True
        time.sleep(0.05)
    return _gone(pid)


@pytest.fixture
def fake(tmp_path: Path) -> Path:
    return _script(tmp_path, "fake-ollama", FAKE_OLLAMA)


def test_serves_on_a_private_port_with_its_own_home_and_store(tmp_path: Path, fake: Path) -> None:
    run = tmp_path / "run"
    with OllamaServer(fake, run, ready_timeout=20) as server:
        assert server.version == "0.0.1-fake"
        assert server.base_url == f"http://127.0.0.1:{server.port}"
        env = json.loads((run / "env.json").read_text())
        assert env["OLLAMA_HOST"] == f"127.0.0.1:{server.port}"
        assert env["HOME"] == str(run / "home") and (run / "home").is_dir()
        assert env["OLLAMA_MODELS"] == str(run / "models") and (run / "models").is_dir()
        assert "OLLAMA_NUM_GPU" not in env  # only the provisioned fork needs it
        assert server.client(timeout=5)._client.base_url.host == "127.0.0.1"
        pid = server.pid
        runner = int((run / "runner.pid").read_text())
    assert "Listening on 127.0.0.1" in (run / LOG_NAME).read_text()
    assert _wait_gone(pid) and _wait_gone(runner), "server or its runner outlived the with-block"


def test_with_block_that_raises_still_stops_everything(tmp_path: Path, fake: Path) -> None:
    run = tmp_path / "run"
    with pytest.raises(KeyError), OllamaServer(fake, run, ready_timeout=20) as server:
        pid = server.pid
        raise KeyError("boom")
    assert _wait_gone(pid) and _wait_gone(int((run / "runner.pid").read_text()))
    server.stop()  # idempotent


def test_process_that_dies_before_ready_raises_with_the_log_tail(tmp_path: Path) -> None:
    binary = _script(tmp_path, "dies", DIES_AT_ONCE)
    server = OllamaServer(binary, tmp_path / "run", ready_timeout=20)
    start = time.monotonic()
    with pytest.raises(
        OllamaServerError, match=r"exited with code 3 before it was ready(.|\n)*permission denied"
    ):
        server.start()
    assert time.monotonic() - start < 10
    assert server.pid is None


def test_a_taken_port_is_retried_on_a_new_port(tmp_path: Path, fake: Path) -> None:
    binary = _script(tmp_path, "taken-once", TAKEN_ONCE)
    run = tmp_path / "run"
    with OllamaServer(binary, run, ready_timeout=20) as server:
        hosts = (run / "attempts").read_text().split()
        assert len(hosts) == 2 and hosts[0] != hosts[1]
        assert server.host == hosts[1] and server.version == "0.0.1-fake"


def test_a_port_held_by_another_server_is_never_mistaken_for_ours(tmp_path: Path, fake: Path) -> None:
    # the other server answers /api/version on that port first; only our own listening socket counts
    with OllamaServer(fake, tmp_path / "other", ready_timeout=20) as other:  # noqa: SIM117 (the inner one needs other.port)
        with OllamaServer(fake, tmp_path / "ours", port=other.port, ready_timeout=20) as ours:
            assert ours.port != other.port and ours._listening()
            assert json.loads((tmp_path / "ours" / "env.json").read_text())["OLLAMA_HOST"] == ours.host


def test_a_port_that_stays_taken_gives_up_after_a_few_ports(tmp_path: Path) -> None:
    binary = _script(tmp_path, "taken", PORT_TAKEN)
    server = OllamaServer(binary, tmp_path / "run", ready_timeout=20)
    with pytest.raises(OllamaServerError, match=rf"is taken.*\(tried {PORT_ATTEMPTS} ports\)"):
        server.start()
    assert server.pid is None


def test_ready_timeout_raises_and_kills_a_server_that_ignores_sigterm(tmp_path: Path) -> None:
    binary = _script(tmp_path, "stuck", NEVER_READY)
    run = tmp_path / "run"
    server = OllamaServer(binary, run, ready_timeout=1.0, stop_grace=0.5)
    with pytest.raises(
        OllamaServerError, match=r"did not answer .*/api/version within 1 s(.|\n)*loading forever"
    ):
        server.start()
    assert _wait_gone(int((run / "stuck.pid").read_text()))
    assert server.pid is None


def test_a_running_server_has_a_pid_file_that_stop_removes(tmp_path: Path, fake: Path) -> None:
    run = tmp_path / "run"
    with OllamaServer(fake, run, ready_timeout=20) as server:
        files = list((run / PID_DIR).glob("*.json"))
        assert len(files) == 1
        record = json.loads(files[0].read_text())
        assert record["pid"] == server.pid and record["name"] == "ollama-serve"
        assert record["cmd"] == [str(fake), "serve"]
        with pytest.raises(OllamaServerError, match="already running"):
            server.start()
    assert list((run / PID_DIR).glob("*.json")) == []


def test_pid_files_go_where_they_are_asked(tmp_path: Path, fake: Path) -> None:
    with OllamaServer(fake, tmp_path / "run", ready_timeout=20, pid_dir=tmp_path / "pids") as server:
        assert [p.name for p in (tmp_path / "pids").glob("*.json")] == [f"ollama-serve-{server.pid}.json"]


def test_missing_binary_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(OllamaServerError, match="cannot run .*no-such-ollama serve"):
        OllamaServer(tmp_path / "no-such-ollama", tmp_path / "run").start()


def test_atexit_stops_a_server_the_program_forgot(tmp_path: Path, fake: Path) -> None:
    code = textwrap.dedent(f"""
        from finetune.serve.ollama_server import OllamaServer
        server = OllamaServer({str(fake)!r}, {str(tmp_path / "run")!r}, ready_timeout=20).start()
        print(server.pid, flush=True)
    """)
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "PYTHONPATH": str(root)}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    assert _wait_gone(int(out.stdout.strip()))
    assert _wait_gone(int((tmp_path / "run" / "runner.pid").read_text()))


def test_fork_env_only_for_a_provisioned_binary(tmp_path: Path) -> None:
    tools = tmp_path / "tools"
    (tools / "bin").mkdir(parents=True)
    (tools / STAMP_NAME).write_text("{}")
    fork = OllamaServer(tools / "bin" / "ollama", tmp_path / "run", port=1234, env_extra={"EXTRA": "1"})
    assert fork.env.items() >= {**FORK_ENV, "OLLAMA_HOST": "127.0.0.1:1234", "EXTRA": "1"}.items()
    plain = OllamaServer(tmp_path / "ollama", tmp_path / "run", port=1234)
    assert "OLLAMA_NUM_GPU" not in plain.env or os.environ.get("OLLAMA_NUM_GPU")
    assert is_provisioned_fork(tools / "bin" / "ollama") and not is_provisioned_fork(tmp_path / "ollama")


def test_host_needs_a_port_and_a_bare_name_is_looked_up_on_path(tmp_path: Path) -> None:
    server = OllamaServer(tmp_path / "ollama", tmp_path / "run")
    with pytest.raises(OllamaServerError, match="no port yet"):
        _ = server.host
    assert OllamaServer("sh", tmp_path).binary.is_absolute()


def test_create_model_surfaces_the_cli_error(tmp_path: Path, fake: Path) -> None:
    server = OllamaServer(fake, tmp_path, port=1234)
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text("FROM x\n")
    assert "success" in server.create_model("good", modelfile)
    with pytest.raises(
        OllamaCommandError, match=r"ollama create bad .*failed \(1\): Error: unknown parameter 'temprature'$"
    ):
        server.create_model("bad", modelfile)
    with pytest.raises(OllamaCommandError, match="no Modelfile"):
        server.create_model("good", tmp_path / "missing")


def test_a_modelfile_named_relative_to_the_callers_folder_is_found(
    tmp_path: Path, fake: Path, monkeypatch
) -> None:
    (tmp_path / "export").mkdir()
    (tmp_path / "export" / "Modelfile").write_text("FROM x\n")
    (tmp_path / "run").mkdir()
    # `finetune export artifacts/run ...` names it from the user's folder; the CLI runs in the server's
    monkeypatch.chdir(tmp_path)
    assert "success" in OllamaServer(fake, tmp_path / "run", port=1234).create_model(
        "m", Path("export/Modelfile")
    )


# ---------------------------------------------------------------- real server


def test_real_server_creates_generates_and_deletes(real_ollama: RealOllama, tmp_path: Path) -> None:
    fmt = chat_format("chatml")
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text(
        render_modelfile(
            real_ollama.gguf, template=fmt.template, stop=fmt.stop, parameters={"temperature": 0}
        )
    )
    with OllamaServer(real_ollama.binary, tmp_path / "run") as server:
        server.create_model("ft-smol", modelfile)
        assert "ft-smol:latest" in server.list_models()
        answer = server.client(timeout=60).generate(
            model="ft-smol", prompt="What is the capital of France?", options={"num_predict": 16, "seed": 0}
        )
        # A pretrained model knows this; garbage here means the CPU build is misconfigured (e.g. the fork
        # without OLLAMA_NUM_GPU=0 answers "-,-'s----").
        assert "Paris" in answer["response"], answer["response"]
        assert answer["done"] is True
        server.delete_model("ft-smol")
        assert "ft-smol:latest" not in server.list_models()
        pid = server.pid
    assert _wait_gone(pid)
