"""The judge stage: one judge per training gate, each reading what the run saved; shared measurements once."""

from __future__ import annotations

from finetune.config.loader import load_config
from finetune.gates.registry import GATES, TRAINING_GATES
from finetune.recipes.commands import RECIPES
from finetune.stages.judge import JUDGES
from finetune.stages.rundir import own_config
from tests.fakes import fake_deps


def test_every_training_gate_has_a_judge_or_is_declared_by_its_row():
    declared = [n for n in TRAINING_GATES if GATES[n].metric is not None]
    assert sorted([*JUDGES, *declared]) == sorted(TRAINING_GATES) and not set(JUDGES) & set(declared)


def _judged(tmp_path, tokenizer, *sets, **deps):
    run = tmp_path / "run"
    cfg = own_config(run, load_config("quick", overrides=list(sets)))
    d = fake_deps(tokenizer, tmp_path / "m")
    for name, fn in deps.items():
        setattr(d, name, fn)
    return RECIPES["run"](cfg, run, d, log=lambda _: None).report


def test_a_skipped_gate_is_reported_skipped_with_its_reason_and_not_measured(tmp_path, toy_tokenizer):
    def no_memory(*a, **k):
        raise AssertionError("a skipped gate must not be measured")

    report = _judged(tmp_path, toy_tokenizer, "gates.skip=[memory_efficiency]", measure_memory=no_memory)
    by = {g.name: g for g in report.gates}
    assert by["memory_efficiency"].status == "skipped" and "gates.skip" in by["memory_efficiency"].detail
    assert {g.name for g in report.gates} == set(TRAINING_GATES)


def test_an_adapter_that_does_not_load_fails_learning_and_artifacts_with_the_reason(tmp_path, toy_tokenizer):
    calls = []

    def broken(*a, **k):
        calls.append(1)
        raise ValueError("safetensors header is cut")

    report = _judged(tmp_path, toy_tokenizer, measure_learning=broken)
    by = {g.name: g for g in report.gates}
    assert calls == [1], "the learning probe is measured once for both gates"
    for name in ("model_learning", "artifacts"):
        assert by[name].status == "failed" and "does not load" in by[name].detail, by[name]
