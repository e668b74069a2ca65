"""Failpoints: named faults only, armed only by the test harness, one point each in the product code, each
exercised by a test, and a run with one planted never passes."""

from __future__ import annotations

import ast
import io
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

import finetune
from finetune import cli, faults
from finetune.gates.registry import GATES
from finetune.report.models import read_report
from tests.fakes import fake_deps
from tests.tiny_run import healthy_sets

PRODUCT = Path(finetune.__file__).parent
TESTS = Path(__file__).resolve().parents[1]
FINETUNE = Path(sys.executable).with_name("finetune")
POINT = re.compile(r'faults\.point\(\s*"([^"]+)"')


def test_injected_reads_a_comma_separated_list_and_refuses_unknown_names():
    assert faults.injected({}) == []
    armed = faults.arming("lr_zero", "adapter_truncated")
    assert faults.injected(armed) == ["lr_zero", "adapter_truncated"]
    assert faults.injected({**armed, faults.ENV: " lr_zero , "}) == ["lr_zero"]
    with pytest.raises(ValueError, match="unknown fault"):
        faults.injected(faults.arming("lr_zer0"))


@pytest.mark.parametrize("arm", [None, "1", "yes", faults.ARM_VALUE.upper()])
def test_a_fault_without_the_arming_key_is_refused_naming_both_variables(arm):
    env = {faults.ENV: "adapter_scale_zero"} | ({} if arm is None else {faults.ARM_ENV: arm})
    with pytest.raises(faults.FaultsNotArmed) as err:
        faults.injected(env)
    assert f"{faults.ENV}=adapter_scale_zero" in str(err.value) and faults.ARM_ENV in str(err.value)


def test_a_point_passes_its_value_through_unless_its_fault_is_planted(plant_fault, tmp_path):
    assert faults.point("lr_zero", 0.1) == 0.1
    assert faults.point("eval_runtime_base", tmp_path / "fused", tmp_path / "base") == tmp_path / "fused"
    plant_fault("lr_zero", "eval_runtime_base")
    assert faults.point("lr_zero", 0.1) == 0.0 and faults.point("modelfile_no_stop", ["</s>"]) == ["</s>"]
    assert faults.point("eval_runtime_base", tmp_path / "fused", tmp_path / "base") == tmp_path / "base"
    plant_fault()
    assert faults.point("lr_zero", 0.1) == 0.1
    with pytest.raises(KeyError, match="no fault named"):
        faults.point("no_such_fault", 1)


def test_an_unarmed_point_refuses_instead_of_planting(monkeypatch):
    monkeypatch.setenv(faults.ENV, "lr_zero")
    monkeypatch.delenv(faults.ARM_ENV, raising=False)
    with pytest.raises(faults.FaultsNotArmed):
        faults.point("lr_zero", 0.1)


def test_every_fault_names_a_real_gate_or_a_stage_error_and_has_an_effect():
    stages = {"data", "train", "fuse", "gguf", "ollama", "evaluate", "export"}
    for name, (stage, where, gate) in faults.FAULTS.items():
        assert stage in stages and where and (gate in GATES or gate == "(stage error)"), name
    assert set(faults.EFFECTS) == set(faults.FAULTS) and set(faults.FAULTS) >= faults.WRITE_ONLY


def test_every_fault_has_exactly_one_point_in_the_product_code_and_every_point_a_fault():
    """A fault that nothing plants would leave a "faulty" run healthy, and its gate would look blind; two points
    would break two things under one name."""
    named: list[str] = []
    for path in PRODUCT.rglob("*.py"):
        if path.name != "faults.py":
            source = path.read_text()
            named += POINT.findall(source)
            assert "faults.active(" not in source, f"{path}: an inline fault; use a one-line faults.point"
    assert sorted(named) == sorted(faults.FAULTS), "each fault once, and no point without a fault"


def _planted_in_tests() -> set[str]:
    """Fault names written in the unit tests that plant faults (plant_fault / plant): what they exercise."""
    names: set[str] = set()
    for path in (TESTS / "unit").rglob("test_*.py"):
        tree = ast.parse(path.read_text())
        calls = {
            getattr(n.func, "id", getattr(n.func, "attr", ""))
            for n in ast.walk(tree)
            if isinstance(n, ast.Call)
        }
        if calls & {"plant_fault", "plant"} and path != Path(__file__):
            names |= {
                n.value for n in ast.walk(tree) if isinstance(n, ast.Constant) and n.value in faults.FAULTS
            }
    return names


def test_every_fault_is_exercised_by_a_unit_test_that_plants_it():
    # the fault suite (tests/faults) plants every fault into the real pipeline too; this is the fast proof
    assert set(faults.FAULTS) - _planted_in_tests() == set(), (
        "add a unit test that plants it and checks its effect"
    )


# ---------------------------------------------------------------- through the CLI


def test_finetune_train_refuses_a_fault_that_is_not_armed(tmp_path):
    if not FINETUNE.exists():
        pytest.skip(f"{FINETUNE} not installed: run `make setup`")
    env = {k: v for k, v in os.environ.items() if k != faults.ARM_ENV} | {faults.ENV: "adapter_scale_zero"}
    sets = [a for s in healthy_sets(tmp_path) for a in ("--set", s)]
    run_dir = tmp_path / "run"
    proc = subprocess.run([str(FINETUNE), "train", "-p", "quick", *sets, "--run-dir", str(run_dir)], env=env,
                          capture_output=True, text=True, timeout=300)  # fmt: skip
    assert proc.returncode == 2, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert (
        f"input error: {faults.ENV}=adapter_scale_zero is set but {faults.ARM_ENV} does not arm it"
        in proc.stderr
    )
    assert "Traceback" not in proc.stderr and not run_dir.exists(), "refused before any work"


def test_an_armed_fault_that_no_gate_judges_still_ends_fault_injected(tmp_path):
    """`finetune train` judges nothing: its planted broken adapter must not look green (the real tiny model)."""
    if not FINETUNE.exists():
        pytest.skip(f"{FINETUNE} not installed: run `make setup`")
    env = dict(os.environ) | faults.arming("adapter_scale_zero")
    sets = [*healthy_sets(tmp_path), "training.iters=4", "training.eval_every=2", "training.save_every=2"]
    run_dir = tmp_path / "run"
    proc = subprocess.run([str(FINETUNE), "train", "-p", "quick", *[a for s in sets for a in ("--set", s)],
                           "--run-dir", str(run_dir), "--quiet"], env=env, capture_output=True, text=True,
                          timeout=600)  # fmt: skip
    report = read_report(run_dir)
    assert proc.returncode == faults.EXIT_CODE == report.exit_code, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert report.status == faults.STATUS and report.faults == ["adapter_scale_zero"] and report.gates == []
    assert all(s.status == "passed" for s in report.stages)  # nothing noticed: only the status says so
    assert '"scale": 0.0' in (run_dir / "adapter" / "adapter_config.json").read_text()  # the fault was real
    assert "FAULT_INJECTED" in proc.stdout and "adapter_scale_zero" in report.reasons[0]


def test_a_run_whose_every_gate_passes_with_a_fault_planted_is_not_passed(
    tmp_path, toy_tokenizer, plant_fault
):
    plant_fault("modelfile_no_stop")  # planted in the ollama stage, which `finetune run` does not reach
    out = io.StringIO()
    code = cli.main(["run", "-p", "quick", "--run-dir", str(tmp_path / "r")],
                    deps=fake_deps(toy_tokenizer, tmp_path / "models"), out=out)  # fmt: skip
    report = read_report(tmp_path / "r")
    assert report.gates and all(g.status == "passed" for g in report.gates), out.getvalue()
    assert (
        code == faults.EXIT_CODE and report.status == faults.STATUS and report.faults == ["modelfile_no_stop"]
    )
