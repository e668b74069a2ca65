"""Workflow orchestration: stage order, and a failing stage recorded in the summary before it propagates."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest

from finetune.config import load_config
from finetune.workflow import Stages, run_workflow


def stages(calls, fail_at=None):
    def step(name, value):
        def inner(*_args, **_kwargs):
            calls.append(name)
            if name == fail_at:
                raise RuntimeError(f"{name} broke")
            return value

        return inner

    verdict = SimpleNamespace(passed=True, to_dict=lambda: {"name": "g", "passed": True})
    return Stages(
        resolve_model=step("model", SimpleNamespace(path=Path("/m"), config={})),
        load_tokenizer=step("tokenizer", object()),
        prepare_data=step("data", {"rows": 3}),
        estimate=step("estimate", {"total_bytes": 1}),
        train=step("train", SimpleNamespace(interrupted=False, to_dict=lambda: {"steps": 3})),
        gates=step("gates", [verdict]),
        log=lambda _m: None,
    )


def test_stages_run_in_data_flow_order(tmp_path):
    calls = []
    result = run_workflow(load_config("quick"), tmp_path, stages(calls))
    assert calls == ["model", "tokenizer", "data", "estimate", "train", "gates"] and result.passed
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["passed"] and [s["status"] for s in summary["stages"]] == ["passed"] * 6


def test_a_failing_stage_is_recorded_and_later_stages_do_not_run(tmp_path):
    calls = []
    with pytest.raises(RuntimeError, match="train broke"):
        run_workflow(load_config("quick"), tmp_path, stages(calls, fail_at="train"))
    assert calls[-1] == "train" and "gates" not in calls
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert summary["stages"][-1] == {**summary["stages"][-1], "stage": "train", "status": "failed",
                                     "error": "RuntimeError: train broke"}  # fmt: skip
    assert summary["passed"] is False
