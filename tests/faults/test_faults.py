"""`make test-faults`: every known fault, planted into the real pipeline (FT_INJECT_FAULT, armed by the harness's
plant_fault), is caught by the gate that exists for it and ends the run `fault_injected`, never `passed`;
healthy runs of three seeds pass every gate (no false failure). The fault lists come from faults.FAULTS.

Tiny GPT-2 (random weights, GPT-2's real tokenizer) learns the healthy data's trained answer in ~100 steps, so
every gate judges something real in seconds. Shipping faults replay a healthy pipeline run with the fault:
the stage cache reruns only the faulted stage and what follows it.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from finetune import faults
from finetune.config.loader import load_config
from finetune.evaluate.evaluation import EvalSettings
from finetune.recipes.commands import COMMANDS, RECIPES
from finetune.serve.ollama_provision import locate_ollama
from finetune.stages.real import real_deps
from finetune.stages.rundir import own_config
from tests import export_cases, fault_table
from tests.tiny_run import MODEL, healthy_sets

STAGE_ERROR = "(stage error)"  # no gate: the stage itself must fail, clearly
GATED = {n: stage for n, (stage, _, gate) in faults.FAULTS.items() if gate != STAGE_ERROR}
# lr_too_high is caught by forgetting, which a random model cannot show (its general-text perplexity falls as
# it trains): tier 2 plants it on SmolLM2 (tests/e2e/test_end_to_end_real_model.py). questions_as_ids is caught
# by the held-out paraphrases of the built-in facts, which only a model that knows language can answer: tier 3
# plants it on SmolLM2 (tests/e2e/test_end_to_end_mlx.py). lora_trains_everything is memory_efficiency's, which
# this suite skips (two probe processes per run): tier 2 plants it on SmolLM2 with the gate on.
PRETRAINED_ONLY = ("lr_too_high", "questions_as_ids", "lora_trains_everything")
TRAIN_FAULTS = [n for n, stage in GATED.items() if stage in ("data", "train") and n not in PRETRAINED_ONLY]
# Gates that must fail on a fault besides the one it is planted for (a fault table row names one gate).
ALSO_CAUGHT = {"lr_zero": ("validation_loss",), "frozen_lora": ("validation_loss",)}
SHIP_FAULTS = [n for n, stage in GATED.items() if stage not in ("data", "train", "export")]

STAGE_ERROR_FAULTS = [n for n, (stage, _, _) in faults.FAULTS.items() if n not in GATED and stage == "train"]
# config.json and GGUF metadata are compared value by value with the base's: a drift stops its stage
SHIP_STAGE_ERROR_FAULTS = [
    n for n, (stage, _, _) in faults.FAULTS.items() if n not in GATED and stage != "train"
]


def _sets(folder: Path, seed: int = 0) -> list[str]:
    return healthy_sets(folder, seed=seed)


def _run(tier: str, run_dir: Path, sets: list[str]):
    cfg = own_config(run_dir, load_config("release" if tier == "pipeline" else "quick", overrides=sets))
    # 4 held-out questions: the tiny data has no paraphrases, so heldout_score asks its test split
    settings = EvalSettings(n_train=8, n_heldout=4) if tier == "pipeline" else None
    return RECIPES[tier](cfg, run_dir, real_deps(), log=lambda _: None, settings=settings).report


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("data")


@pytest.fixture(scope="module")
def healthy(tmp_path_factory, data_dir):
    """A healthy pipeline run of seed 0: the base every shipping fault replays."""
    if locate_ollama().binary is None:
        pytest.skip(f"the shipping faults need Ollama: {locate_ollama().reason}")
    run_dir = tmp_path_factory.mktemp("healthy") / "run"
    return run_dir, _run("pipeline", run_dir, _sets(data_dir, 0))


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_a_healthy_seed_passes_every_gate(seed, healthy, tmp_path, data_dir, record):
    report = healthy[1] if seed == 0 else _run("pipeline", tmp_path / "run", _sets(data_dir, seed))
    record(fault="healthy", seed=seed, model=MODEL, expected="(none fails)", caught=report.status == "passed",
           status=report.status, failed=fault_table.failures(report))  # fmt: skip
    assert report.status == "passed", report.reasons
    assert {g.name for g in report.gates} >= set(COMMANDS["pipeline"].gates)


@pytest.mark.parametrize("fault", TRAIN_FAULTS)
def test_a_training_fault_is_caught_by_its_gate(fault, tmp_path, data_dir, record, plant_fault):
    plant_fault(fault)
    gate = faults.FAULTS[fault][2]
    report = _run("run", tmp_path / "run", [*_sets(data_dir), "gates.skip=[memory_efficiency,forgetting]"])
    failed = {g.name for g in report.gates if g.status == "failed"}
    record(fault=fault, model=MODEL, expected=gate, caught=gate in failed, status=report.status,
           failed=fault_table.failures(report))  # fmt: skip
    assert report.faults == [fault] and (report.status, report.exit_code) == (faults.STATUS, faults.EXIT_CODE)
    assert gate in failed, f"{fault} was not caught by {gate}; failed: {sorted(failed)}"
    for also in ALSO_CAUGHT.get(fault, ()):
        assert also in failed, f"{fault} was not caught by {also}; failed: {sorted(failed)}"


@pytest.mark.parametrize("fault", SHIP_FAULTS)
def test_a_shipping_fault_is_caught_by_its_gate_and_only_its_stage_onward_reruns(fault, healthy, tmp_path,
                                                                                   data_dir, record, plant_fault):  # fmt: skip
    healthy_dir, _ = healthy
    run_dir = tmp_path / "run"
    shutil.copytree(healthy_dir, run_dir, symlinks=True)
    plant_fault(fault)
    gate, stage = faults.FAULTS[fault][2], faults.FAULTS[fault][0]
    report = _run("pipeline", run_dir, _sets(data_dir, 0))
    failed = {g.name for g in report.gates if g.status == "failed"}
    record(fault=fault, model=MODEL, expected=gate, caught=gate in failed, status=report.status,
           failed=fault_table.failures(report))  # fmt: skip
    assert report.faults == [fault] and (report.status, report.exit_code) == (faults.STATUS, faults.EXIT_CODE)
    assert gate in failed, f"{fault} was not caught by {gate}; failed: {sorted(failed)}"
    order = [s.name for s in report.stages]
    assert all(s.cached for s in report.stages[: order.index(stage)]), "upstream stages come from the cache"


# `finetune export` on the healthy run: adapters and quantized GGUFs, and every export fault (tests/export_cases.py).
# Tiny GPT-2: mlx-lm's module names differ from transformers' (model.h vs transformer.h) and its Conv1D weights are
# stored (in, out): the PEFT export must say so (fan_in_fan_out) to load at all.
@pytest.mark.parametrize("case", export_cases.cases(export_cases.quant_for(MODEL)))
def test_an_export_is_judged_where_it_is_loaded(case, healthy, tmp_path, record, plant_fault):
    run_dir = tmp_path / "run"
    shutil.copytree(healthy[0], run_dir, symlinks=True)
    row, code, want = export_cases.run_case(run_dir, case, MODEL, plant_fault)
    record(**row)
    assert row["caught"], row["failed"]
    assert code == want


@pytest.fixture(scope="module")
def other_run(tmp_path_factory, data_dir):
    """A second fine-tune of the same base on other data (every answer "No"), trained only."""
    run_dir = tmp_path_factory.mktemp("other") / "run"
    cfg = own_config(run_dir, load_config("quick", overrides=healthy_sets(data_dir, answer="No")))
    assert RECIPES["train"](cfg, run_dir, real_deps(), log=lambda _: None).report.status != "failed"
    return run_dir


@pytest.mark.parametrize("case", ["healthy", *export_cases.SHARED_FAULTS])
def test_two_adapters_on_one_base_each_answer_their_own_questions(case, healthy, other_run, tmp_path, record,
                                                                  plant_fault):  # fmt: skip
    runs = [tmp_path / "yes", tmp_path / "no"]
    for src, dst in zip((healthy[0], other_run), runs, strict=True):
        shutil.copytree(src, dst, symlinks=True)
    row, code, want = export_cases.run_shared(runs, tmp_path / "shipped", case, MODEL, plant_fault)
    record(**row)
    assert row["caught"], row["failed"]
    assert code == want


@pytest.mark.parametrize("fault", SHIP_STAGE_ERROR_FAULTS)
def test_a_shipping_file_that_drifts_from_the_base_stops_its_stage_naming_the_key(fault, healthy, tmp_path, data_dir,
                                                                                   record, plant_fault):  # fmt: skip
    run_dir = tmp_path / "run"
    shutil.copytree(healthy[0], run_dir, symlinks=True)
    plant_fault(fault)
    report = _run("pipeline", run_dir, _sets(data_dir, 0))
    stage = next(s for s in report.stages if s.name == faults.FAULTS[fault][0])
    caught = stage.status == "failed" and "epsilon" in (stage.reason or "")
    record(fault=fault, model=MODEL, expected=STAGE_ERROR, caught=caught, status=report.status,
           failed=[f"{stage.name}: {(stage.reason or '')[:160]}"])  # fmt: skip
    assert caught, stage.reason
    assert report.faults == [fault] and (report.status, report.exit_code) == (faults.STATUS, faults.EXIT_CODE)


# The one training stage-error fault we have; a new one fails here until it has its own case.
@pytest.mark.parametrize("fault", STAGE_ERROR_FAULTS)
def test_a_full_disk_during_a_checkpoint_fails_clearly_and_keeps_the_previous_one(fault, tmp_path, data_dir, record,
                                                                                   plant_fault):  # fmt: skip
    from finetune.train.checkpoints import latest_checkpoint, restore_checkpoint

    plant_fault(fault)
    run_dir = tmp_path / "run"
    report = _run("run", run_dir, _sets(data_dir))
    train = next(s for s in report.stages if s.name == "train")
    caught = train.status == "failed" and "No space left on device" in (train.reason or "")
    record(fault=fault, model=MODEL, expected=STAGE_ERROR, caught=caught, status=report.status,
           failed=[f"train: {(train.reason or '')[:120]}"])  # fmt: skip
    assert caught and "the previous checkpoint" in train.reason and "is intact" in train.reason
    assert report.faults == [fault] and (report.status, report.exit_code) == (faults.STATUS, faults.EXIT_CODE)
    ckpt = latest_checkpoint(run_dir)
    assert ckpt is not None and ckpt.name == "step-0000050" and not list(run_dir.glob("checkpoints/.*tmp"))
    import mlx.optimizers as optim
    from mlx_lm import load

    from finetune.train.setup import prepare_model

    model, _ = load(str(Path(report.stages[0].details["path"])))
    prepare_model(model, load_config("quick", overrides=_sets(data_dir)))
    assert restore_checkpoint(ckpt, model, optim.Adam(learning_rate=1e-3))["step"] == 50
