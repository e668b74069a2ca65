"""The train-side stages: training resumes only its own checkpoints; the judge reads what the run saved."""

from __future__ import annotations

import os
import shutil
from dataclasses import replace

import pytest

from finetune.config.loader import load_config
from finetune.recipes.commands import RECIPES
from finetune.stages.rundir import own_config
from finetune.stages.training import TRAIN_KEY
from tests.fakes import FakeTrainer, fake_deps, fake_learning


def _run(tmp_path, tokenizer, trainer, *sets, overrides=()):
    run = tmp_path / "run"
    cfg = own_config(run, load_config("quick", overrides=list(sets)) if not (run / "config.yaml").exists() else None,
                     overrides)  # fmt: skip
    return RECIPES["train"](cfg, run, fake_deps(tokenizer, tmp_path / "m", trainer), log=lambda _: None)


def test_an_interrupted_training_resumes_and_a_cadence_override_still_resumes(tmp_path, toy_tokenizer):
    assert _run(tmp_path, toy_tokenizer, FakeTrainer(interrupt_at=4)).exit_code == 130
    key = (tmp_path / "run" / TRAIN_KEY).read_text()
    trainer = FakeTrainer()
    assert _run(tmp_path, toy_tokenizer, trainer, overrides=["training.iters=50"]).exit_code == 0
    assert trainer.calls[0]["resume"] is True and (tmp_path / "run" / TRAIN_KEY).read_text() == key


def test_checkpoints_of_other_inputs_are_cleared_not_resumed(tmp_path, toy_tokenizer):
    assert _run(tmp_path, toy_tokenizer, FakeTrainer(interrupt_at=4)).exit_code == 130
    (tmp_path / "run" / TRAIN_KEY).write_text("another run's inputs\n")
    trainer = FakeTrainer()
    assert _run(tmp_path, toy_tokenizer, trainer).exit_code == 0
    assert trainer.calls[0]["resume"] is False
    assert sorted(p.name for p in (tmp_path / "run" / "checkpoints").iterdir()) == ["step-0000048"]


@pytest.mark.parametrize(("fault", "resumes"), [("disk_full_checkpoint", True), ("lr_zero", False)])
def test_after_a_write_only_fault_a_healthy_rerun_resumes_but_not_after_one_that_changed_training(
    tmp_path, toy_tokenizer, plant_fault, fault, resumes
):
    plant_fault(fault)
    assert _run(tmp_path, toy_tokenizer, FakeTrainer(interrupt_at=4)).exit_code == 130
    plant_fault()
    trainer = FakeTrainer()
    assert _run(tmp_path, toy_tokenizer, trainer).exit_code == 0
    assert trainer.calls[0]["resume"] is resumes


def test_the_judge_says_why_each_gate_exists_and_which_artifact_it_read(tmp_path, toy_tokenizer):
    run = tmp_path / "run"
    cfg = own_config(run, load_config("quick"))
    result = RECIPES["run"](cfg, run, fake_deps(toy_tokenizer, tmp_path / "m"), log=lambda _: None)
    by = {g.name: g for g in result.report.gates}
    assert (
        by["artifacts"].artifact["path"].endswith("adapter") and len(by["artifacts"].artifact["sha256"]) == 64
    )
    assert by["loss_convergence"].artifact["path"].endswith("metrics.jsonl")
    assert "frozen" in by["parameter_updates"].why and by["memory_efficiency"].data["source"] == "estimated"


def test_the_data_stage_says_what_it_left_out_on_the_console(tmp_path, toy_tokenizer):
    lines: list[str] = []
    cfg = own_config(tmp_path / "run", load_config("release", overrides=["data.template=chatml"]))
    deps = fake_deps(toy_tokenizer, tmp_path / "m", FakeTrainer())
    RECIPES["train"](cfg, tmp_path / "run", deps, log=lines.append)
    assert any(
        line.startswith("[data] held-out: 4 of 25 paraphrases ask about facts that landed in valid/test")
        for line in lines
    ), lines


def test_the_learning_probe_answers_within_the_data_s_budget(tmp_path, toy_tokenizer):
    """The judge asks base + adapter with the generation budget the data implies (a long-answer set is not cut
    at a fixed 24 tokens), the one training's in-memory hook used."""
    from finetune.evaluate.budget import answer_budget

    seen = []

    def spy(run_dir, base, cfg, stops, *, max_tokens, **_):
        seen.append(max_tokens)
        return fake_learning(run_dir, base, cfg, stops)

    cfg = own_config(tmp_path / "run", load_config("quick", overrides=["data.source=builtin:arithmetic"]))
    deps = replace(fake_deps(toy_tokenizer, tmp_path / "m", FakeTrainer()), measure_learning=spy)
    assert RECIPES["run"](cfg, tmp_path / "run", deps, log=lambda _: None).exit_code == 0
    assert seen == [answer_budget(tmp_path / "run" / "data", toy_tokenizer).tokens] and seen[0] != 24


def test_the_full_memory_probe_runs_beside_training_and_stops_with_it(tmp_path, toy_tokenizer):
    calls = []

    def prefetch(run_dir, model_dir, model_config, cfg, *, available):
        calls.append(run_dir.name)
        return lambda cancel: calls.append("cancelled" if cancel else "joined") or "full probe prefetched"

    def run(name, trainer, *sets):
        cfg = own_config(tmp_path / name, load_config("quick", overrides=list(sets)))
        deps = fake_deps(toy_tokenizer, tmp_path / "m", trainer, prefetch_memory=prefetch)
        return RECIPES["run"](cfg, tmp_path / name, deps, log=lambda _: None).report

    report = run("a", FakeTrainer())
    assert calls == ["a", "joined"]
    assert (
        next(s for s in report.stages if s.name == "train").details["beside_training"]
        == "full probe prefetched"
    )
    assert run("b", FakeTrainer(interrupt_at=4)).exit_code == 130 and calls[2:] == ["b", "cancelled"]
    run("c", FakeTrainer(), "gates.skip=[memory_efficiency]")
    assert calls[4:] == []  # nothing judges it: nothing is measured


def test_the_base_learning_measurement_runs_beside_training_and_the_judge_waits_for_it(
    tmp_path, toy_tokenizer
):
    calls = []

    def prefetch_memory(run_dir, model_dir, model_config, cfg, *, available):
        return lambda cancel: calls.append(("probe", cancel)) or "full probe prefetched"

    def prefetch_base(run_dir, base_dir, *, after, evaluation, where):
        assert evaluation is False  # `run` has no evaluation to ask the base for
        calls.append(("base", base_dir.name))
        before = (lambda cancel: f"{after(cancel)}; ") if after else (lambda cancel: "")
        return lambda cancel: before(cancel) + (calls.append(("base", cancel)) or f"base measured {where}")

    def learning(*a, base_ready, **k):  # the judge measures the saved adapter, then waits for the base
        calls.append("adapter")
        base_ready()
        return fake_learning(*a, **k)

    def run(name, trainer, *sets, memory=8 * 2**30):
        cfg = own_config(tmp_path / name, load_config("quick", overrides=list(sets)))
        deps = fake_deps(toy_tokenizer, tmp_path / "m", trainer, prefetch_memory=prefetch_memory,
                         prefetch_base_learning=prefetch_base, available_memory=lambda: memory)  # fmt: skip
        deps = replace(deps, measure_learning=learning)
        report = RECIPES["run"](cfg, tmp_path / name, deps, log=lambda _: None).report
        return report, {s.name: s.details for s in report.stages}

    report, details = run("a", FakeTrainer())
    assert report.exit_code == 0
    base = ("base", "smollm2-135m")
    assert calls == [base, ("probe", False), "adapter", ("probe", False), ("base", False)]
    assert details["train"]["beside_training"].startswith(
        "full probe prefetched; base answers being measured"
    )
    assert details["judge"]["beside_training"] == "full probe prefetched; base measured beside training"
    calls.clear()
    report, _ = run("b", FakeTrainer(interrupt_at=4))
    assert report.exit_code == 130 and calls == [base, ("probe", True), ("base", True)]
    calls.clear()
    run("c", FakeTrainer(), "gates.skip=[model_learning,artifacts,forgetting]")
    assert calls == [("probe", False)]  # nothing judges the base's answers: they are not measured
    calls.clear()
    run("d", FakeTrainer(), memory=1)
    assert base not in calls and "adapter" in calls
    calls.clear()

    class NoAdapter(FakeTrainer):  # the train stage fails after training: no judge takes the base's
        def __call__(self, *a, **k):
            out = super().__call__(*a, **k)
            shutil.rmtree(tmp_path / "e" / "adapter")
            return out

    report, _ = run("e", NoAdapter())
    assert report.exit_code != 0 and calls == [base, ("probe", False), ("probe", True), ("base", True)]
    calls.clear()

    class Marked(FakeTrainer):  # says when training ended
        def __call__(self, *a, **k):
            out = super().__call__(*a, **k)
            calls.append("trained")
            return out

    # ranks on every core: no core beside training; the base is measured beside the judge's adapter instead
    # the base starts after it, and the judge waits for it after the adapter; the full probe stays the judge's
    n = os.cpu_count() or 1
    report, details = run("f", Marked(), f"training.ranks={n}", f"training.batch_size={max(4, n)}")
    assert report.exit_code == 0 and calls == ["trained", base, "adapter", ("base", False)]
    assert "base answers being measured beside the judge" in details["train"]["beside_training"]
    assert details["judge"]["beside_training"] == "base measured beside the judge (the ranks used every core)"
    calls.clear()
    report, details = run("g", Marked(), f"training.ranks={n}", f"training.batch_size={max(4, n)}", memory=1)
    assert calls == ["trained", "adapter"]  # no room for the base: the judge measures it
