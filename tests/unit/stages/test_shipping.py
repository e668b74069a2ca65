"""The shipping stages' own decisions (the full flow is in test_pipeline.py)."""

from __future__ import annotations

import pytest

from finetune.config.loader import load_config
from finetune.evaluate.evaluation import EvalSettings
from finetune.recipes.commands import RECIPES
from finetune.stages.rundir import own_config
from tests.unit.recipes.test_pipeline import World


def _run(world, *sets):
    cfg = own_config(world.root / "run", load_config("release", overrides=["data.num_examples=40", *sets]))
    return RECIPES["pipeline"](
        cfg, world.root / "run", world.deps(), log=lambda _: None, settings=EvalSettings()
    )


def test_fuse_exactness_is_measured_for_lora(tmp_path, toy_tokenizer):
    result = _run(World(tmp_path, toy_tokenizer))
    g = next(g for g in result.report.gates if g.name == "fuse_exactness")
    assert g.status == "passed" and g.measured == 1e-7 and g.artifact["path"].endswith("fused")


def test_a_fused_config_that_is_not_the_bases_fails_the_fuse_stage(tmp_path, toy_tokenizer):
    world = World(tmp_path, toy_tokenizer)
    world.fused_config_changes = {"max_position_embeddings": 512}
    fuse = next(s for s in _run(world).report.stages if s.name == "fuse")
    assert (
        fuse.status == "failed" and "config.json max_position_embeddings: base None, fused 512" in fuse.reason
    )


def test_a_modelfile_without_stops_is_served_but_fails_served_template(tmp_path, toy_tokenizer, plant_fault):
    plant_fault("modelfile_no_stop")
    result = _run(World(tmp_path, toy_tokenizer))
    g = next(g for g in result.report.gates if g.name == "served_template")
    assert g.status == "failed" and "lack ['<|im_end|>', '<|im_start|>']" in g.detail
    assert next(s for s in result.report.stages if s.name == "ollama").status == "passed"


@pytest.mark.parametrize(
    ("fault", "gate", "says"),
    [
        ("modelfile_extra_stop", "served_template", "served stop strings ['User:'] are not end markers"),
        ("modelfile_short_num_predict", "served_defaults", "cuts answers shorter than the longest reference"),
        ("modelfile_no_temperature", "served_defaults", "no temperature: default requests sample"),
    ],
)
def test_a_modelfile_that_serves_otherwise_than_judged_fails_its_gate(
    tmp_path, toy_tokenizer, plant_fault, fault, gate, says
):
    plant_fault(fault)
    result = _run(World(tmp_path, toy_tokenizer))
    failed = {g.name: g for g in result.report.gates if g.status == "failed"}
    assert set(failed) == {gate} and says in failed[gate].detail


def test_the_modelfile_holds_the_data_s_answer_budget_and_a_context_for_the_trained_length(
    tmp_path, toy_tokenizer
):
    result = _run(World(tmp_path, toy_tokenizer))
    text = (tmp_path / "run" / "ollama" / "Modelfile").read_text()
    ollama = next(s for s in result.report.stages if s.name == "ollama")
    assert "PARAMETER num_ctx 2048" in text and "PARAMETER num_predict 256" in text
    assert "PARAMETER temperature 0" in text
    evaluate = next(s for s in result.report.stages if s.name == "evaluate")
    budget = evaluate.details["budget"]
    assert (
        2 <= budget["longest_answer"] < budget["used"] == budget["tokens"] < 256 and ollama.status == "passed"
    )


def test_a_runtime_that_crashed_fails_its_gate_and_is_asked_again_on_the_next_run(tmp_path, toy_tokenizer):
    world = World(tmp_path, toy_tokenizer)
    world.runner_crashes = True
    first = _run(world)
    g = next(g for g in first.report.gates if g.name == "output_parity")
    assert (
        first.report.status == "failed"
        and g.status == "failed"
        and "runner process has terminated" in g.detail
    )
    world.runner_crashes = False
    second = _run(world)
    assert world.calls.count("evaluate") == 2 and second.report.status == "passed", second.report.reasons
    assert next(s for s in second.report.stages if s.name == "fuse").cached
