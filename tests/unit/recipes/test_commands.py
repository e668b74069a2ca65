"""The commands differ only in the stages their recipes run and the gates they require."""

from __future__ import annotations

from finetune.config.loader import load_config
from finetune.gates.registry import GATES
from finetune.recipes.commands import COMMANDS, RECIPES
from finetune.stages.rundir import own_config
from tests.fakes import fake_deps


def test_every_required_gate_exists_and_train_is_not_judged(tmp_path, toy_tokenizer):
    for command in COMMANDS.values():
        assert set(command.gates) <= set(GATES), command.name
    assert COMMANDS["train"].gates == () and not COMMANDS["train"].judged
    assert set(RECIPES) == set(COMMANDS)
    run, deps = tmp_path / "run", fake_deps(toy_tokenizer, tmp_path / "m")
    result = RECIPES["run"](own_config(run, load_config("quick")), run, deps, log=lambda _: None)
    assert [s.name for s in result.report.stages] == ["model", "data", "estimate", "train", "judge"]
    result = RECIPES["train"](own_config(run, load_config("quick")), run, deps, log=lambda _: None)
    assert result.report.status == "not_judged"
    assert [s.name for s in result.report.stages] == ["model", "data", "train"]
