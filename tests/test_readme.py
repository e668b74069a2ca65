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
    for target in ("test-e2e-workflow", "test-e2e-real-model", "test-e2e-mlx", "test-e2e-quick", "test-e2e-all",
                   "lint", "bench", "ollama", "setup"):  # fmt: skip
        assert subprocess.run(["make", "-n", target], cwd=ROOT, capture_output=True).returncode == 0, target


def test_every_cli_example_parses():
    examples = [line for block in code_blocks() for line in block if line.startswith("finetune ")]
    assert len(examples) >= 8
    parser = build_parser()
    for line in examples:
        parser.parse_args(shlex.split(line)[1:])


def test_make_run_fast_equivalent(tmp_path):
    """`make run` = `finetune run --profile quick`; here on the locally built tiny model, few steps.

    A random 3M-parameter model barely moves under LoRA in 12 steps, so this equivalent fine-tunes it
    fully; the real `make run` (SmolLM2, LoRA) is measured in tier 2's budget and in the README.
    """
    if not FINETUNE.exists():
        pytest.skip(f"{FINETUNE} not installed: run `make setup`")
    sets = ["model.name=tiny-llama", "training.fine_tune_type=full", "training.learning_rate=1e-2",
            "training.iters=12", "data.num_examples=40"]  # fmt: skip
    cmd = [
        str(FINETUNE),
        "run",
        "--profile",
        "quick",
        *[a for s in sets for a in ("--set", s)],
        "--run-dir",
        str(tmp_path),
    ]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert f"report: {tmp_path / 'summary.json'}" in proc.stdout
    assert (tmp_path / "adapter/adapters.safetensors").is_file()


def test_config_show_command_runs():
    proc = subprocess.run(
        [str(FINETUNE), "config", "show", "--profile", "quick"], capture_output=True, text=True
    )
    assert proc.returncode == 0 and "num_layers: 8" in proc.stdout
