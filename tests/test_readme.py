"""The README's promises: its first two commands are `make run` and `make test`, and they (or their
fast equivalents) work; every `finetune ...` example in it parses."""

from __future__ import annotations

import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

from finetune.cli import build_parser

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
FINETUNE = Path(sys.executable).with_name("finetune")


def code_blocks() -> list[list[str]]:
    blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    return [
        [line.split("#")[0].strip() for line in b.splitlines() if line.split("#")[0].strip()] for b in blocks
    ]


def test_first_two_commands_are_make_run_and_make_test():
    assert code_blocks()[0] == ["make run", "make test"]


def test_make_targets_do_what_the_readme_says():
    def dry(target: str) -> str:
        return subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True, text=True).stdout

    assert "finetune run --profile quick" in dry("run")
    assert "tests/e2e/test_end_to_end_workflow.py" in dry("test") and "tests/unit" in dry("test")
    for target in ("test-e2e-workflow", "test-e2e-real-model", "test-e2e-mlx", "test-e2e-ollama", "test-e2e-quick",
                   "test-e2e-all", "test-faults", "test-chaos", "lint", "bench", "ollama", "setup"):  # fmt: skip
        assert subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True).returncode == 0, target


def test_every_cli_example_parses():
    examples = [line for block in code_blocks() for line in block if line.startswith("finetune ")]
    assert len(examples) >= 8
    parser = build_parser()
    for line in examples:
        parser.parse_args(shlex.split(line)[1:])


def test_make_run_fast_equivalent(tmp_path):
    """`make run` = `finetune run --profile quick`; here on the locally built tiny model with the healthy tiny
    data (tests/tiny_run.py): the same command, stages and gates, in about a minute. The real `make run`
    (SmolLM2) is tier 2."""
    if not FINETUNE.exists():
        pytest.skip(f"{FINETUNE} not installed: run `make setup`")
    from tests.tiny_run import healthy_sets

    cmd = [str(FINETUNE), "run", "--profile", "quick", *[a for s in healthy_sets(tmp_path) for a in ("--set", s)],
           "--run-dir", str(tmp_path / "run")]  # fmt: skip
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"report: {tmp_path / 'run' / 'report.json'}" in proc.stdout
    for gate in ("loss_convergence", "model_learning", "memory_efficiency", "parameter_updates", "artifacts"):
        assert f"[PASS] {gate}: measured " in proc.stdout, gate
    assert (tmp_path / "run" / "adapter" / "adapters.safetensors").is_file()
    assert (tmp_path / "run" / "report.html").is_file()


def test_config_show_command_runs():
    proc = subprocess.run(
        [str(FINETUNE), "config", "show", "--profile", "quick"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "num_layers: 8" in proc.stdout and "template: auto" in proc.stdout
