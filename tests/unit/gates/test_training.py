"""Five of the training gates: each fails on a broken run and passes on a healthy one.

First on hand-made measurements, then on real tiny training runs (a 2-layer Llama saved as an HF folder,
mlx-lm's trainer, ~1 s each) with a fault planted (tests/conftest.py's plant): the gate meant for each fault
must fail on what the run saved to disk.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from finetune.gates.registry import DEFAULT
from finetune.gates.training import (
    artifacts,
    declared_gate,
    is_adapter_tensor,
    loss_convergence,
    memory_efficiency,
    model_learning,
    parameter_updates,
)

HEALTHY = [3.0, 2.9, 2.8, 2.6, 2.5, 2.2, 2.0, 1.8, 1.5, 1.3, 1.2, 1.1]

# ---------------------------------------------------------------- loss convergence


def test_loss_gate_passes_on_a_falling_loss():
    v = loss_convergence(HEALTHY, drop=0.05, window=4)
    assert v.passed and v.measured == pytest.approx(np.mean(HEALTHY[-4:]) / np.mean(HEALTHY[:4]))
    assert v.data == {
        "initial": pytest.approx(np.mean(HEALTHY[:4])),
        "final": pytest.approx(np.mean(HEALTHY[-4:])),
    }


def test_loss_gate_fails_on_flat_loss_like_lr_zero():
    assert not loss_convergence([2.5] * 12, drop=0.05, window=4).passed


def test_loss_gate_fails_on_rising_loss_and_nan():
    assert not loss_convergence(HEALTHY[::-1], window=4).passed
    assert "NaN" in loss_convergence([*HEALTHY[:-1], float("nan")], window=4).detail
    assert not loss_convergence([*HEALTHY[:-1], float("inf")], window=4).passed


def test_loss_gate_uses_windows_not_single_steps():
    # one lucky last step must not pass a run that did not learn
    noisy = [2.5, 2.6, 2.4, 2.5, 2.6, 2.4, 2.5, 2.6, 2.5, 2.0]  # last/first step = 0.8
    assert not loss_convergence(noisy, window=5).passed


def test_loss_gate_absolute_caps_and_too_few_steps():
    assert not loss_convergence(HEALTHY, window=4, max_final=1.0).passed
    assert not loss_convergence(HEALTHY, window=4, max_initial=2.0).passed
    assert loss_convergence(HEALTHY, window=4, max_initial=3.5, max_final=1.5).passed
    assert "need >= 8 steps" in loss_convergence(HEALTHY[:5], window=4).detail


# ---------------------------------------------------------------- model learning


def test_learning_gate():
    refs = ["Velmora", "42", "Qx-17", "Bren"]
    before = ["Paris", "41", "I don't know", "Bren"]
    after = ["Velmora.", "It is 42", "QX-17", "Bren"]
    v = model_learning(before, after, refs, loss_before=3.0, loss_after=0.5)
    assert v.passed and v.measured == 0.75
    assert [c["after_score"] for c in v.data["cases"]] == [2, 1, 2, 2]
    # same answers before and after (frozen adapter / lr 0): no wins
    assert not model_learning(before, before, refs, loss_before=3.0, loss_after=3.0).passed
    # answers improved but teacher-forced loss rose: not learning the references
    v = model_learning(before, after, refs, loss_before=1.0, loss_after=1.2)
    assert not v.passed and "did not drop" in v.detail
    # exactly at the threshold is not "more than"
    assert not model_learning(before[:1] * 10, ["Velmora"] * 3 + ["Paris"] * 7, refs[:1] * 10,
                              loss_before=3, loss_after=1, threshold=0.3).passed  # fmt: skip


def test_learning_gate_grades_long_answers_by_similarity():
    """A function body is never reproduced word for word: the trained answer wins when it is clearly closer."""
    refs = ["    total = 0\n    for x in values:\n        total += x * x\n    return total\n"] * 2
    before = ["Here is how you might compute the sum of squares of the values.", "return sum(values)"]
    near = refs[0].replace("x * x", "x ** 2")  # one token off: not exact, not contained, 0.9+ similar
    v = model_learning(before, [near, near], refs, loss_before=2.0, loss_after=0.4)
    assert v.passed and v.measured == 1.0 and "2 long references graded" in v.detail
    assert 0.9 < v.data["cases"][0]["after_score"] < 1
    # a lr ~0 adapter changes a word here and there: gains under MIN_GAIN are no wins
    drift = ["Here is how you could compute the sum of squares of the values.", "return sum(values)"]
    assert model_learning(before, drift, refs, loss_before=2.0, loss_after=1.99).measured == 0.0


def test_learning_gate_needs_matching_non_empty_answers():
    assert not model_learning([], [], [], loss_before=1, loss_after=0).passed
    v = model_learning(["a"], ["b", "c"], ["b"], loss_before=1, loss_after=0)
    assert not v.passed and "differ in number" in v.detail


# ---------------------------------------------------------------- memory efficiency


def test_memory_gate():
    v = memory_efficiency(400 << 20, 1000 << 20, saving=0.3)
    assert v.passed and v.measured == pytest.approx(0.6) and v.data == {"source": "measured"}
    assert not memory_efficiency(800 << 20, 1000 << 20, saving=0.3).passed
    assert not memory_efficiency(0, 1000, saving=0.3).passed
    est = memory_efficiency(400 << 20, 1000 << 20, saving=0.3, source="estimated")
    assert est.detail.startswith("estimated:") and est.data["source"] == "estimated"


# ---------------------------------------------------------------- parameter updates (hand-made tensors)

DIGESTS = {"model.safetensors": "aa", "config.json": "bb"}


def _lora(seed: int, b_moves: bool = True):
    rng = np.random.default_rng(seed)
    return {
        "l.lora_a": rng.normal(size=(8, 4)),
        "l.lora_b": rng.normal(size=(4, 8)) if b_moves else np.zeros((4, 8)),
    }


STEP0 = {"l.lora_a": np.full((8, 4), 0.1), "l.lora_b": np.zeros((4, 8))}


def _updates(initial, final, *, steps=5, base_now=DIGESTS, **kw):
    return parameter_updates(initial, final, steps=steps, base_recorded=DIGESTS, base_now=base_now, **kw)


def test_parameter_gate_passes_when_every_adapter_tensor_moved():
    v = _updates(STEP0, _lora(1))
    assert v.passed and v.measured == 1.0 and v.data["frozen_tensors"] == []


def test_parameter_gate_fails_on_frozen_adapters():
    v = _updates(STEP0, STEP0)
    assert not v.passed and v.measured == 0.0
    assert v.data["frozen_tensors"] == ["l.lora_a", "l.lora_b"]


def test_parameter_gate_fails_when_one_adapter_never_moved_though_most_elements_did():
    layers = {f"l{i}.{leaf}": t for i in range(10) for leaf, t in STEP0.items()}
    final = {k: (v if k.startswith("l0.") else v + 1.0) for k, v in layers.items()}  # layer 0 not wired in
    v = _updates(layers, final)
    assert v.measured == 0.9 and v.measured > DEFAULT["lora_params_changed"]  # the element share alone passes
    assert not v.passed and "2 of 20 adapter tensors never moved (e.g. l0.l.lora_a)" in v.detail


def test_parameter_gate_fails_when_lora_b_stays_at_zero():
    v = _updates(STEP0, _lora(1, b_moves=False))  # only lora_a moved: half the elements
    assert not v.passed and v.measured == 0.5 and v.data["frozen_tensors"] == ["l.lora_b"]


def test_parameter_gate_fails_on_a_trained_base_tensor_in_the_adapter():
    initial = {**STEP0, "model.norm.weight": np.ones(4)}
    final = {**_lora(1), "model.norm.weight": np.full(4, 1.01)}
    v = _updates(initial, final)
    assert not v.passed and v.data["base_trained"] == ["model.norm.weight"]
    assert _updates(initial, final, fine_tune_type="full").passed  # full fine-tuning trains base tensors


def test_parameter_gate_fails_when_a_base_file_changed_on_disk():
    v = _updates(STEP0, _lora(1), base_now={**DIGESTS, "model.safetensors": "cc"})
    assert not v.passed and v.data["base_files_moved"] == ["model.safetensors"]
    v = parameter_updates(STEP0, _lora(1), steps=5, base_recorded={}, base_now=DIGESTS)
    assert not v.passed and "no base model file digests were recorded" in v.detail


def test_parameter_gate_fails_on_too_few_steps_or_mismatched_sets():
    assert not _updates(STEP0, _lora(1), steps=2).passed
    assert not _updates({}, {}).passed
    v = _updates(STEP0, {"l.lora_a": STEP0["l.lora_a"] + 1})
    assert not v.passed and "differ from step 0" in v.detail


def test_adapter_tensor_names():
    assert is_adapter_tensor("model.layers.0.self_attn.q_proj.lora_a")
    assert is_adapter_tensor("model.layers.0.self_attn.q_proj.m")  # DoRA magnitude
    assert not is_adapter_tensor("model.layers.0.self_attn.q_proj.weight")
    assert not is_adapter_tensor("model.norm.weight")


# ---------------------------------------------------------------- artifacts (hand-made answers)


def test_artifacts_gate():
    v = artifacts([], ["8", "9"], ["8", "9"])
    assert v.passed and v.measured == 1.0
    v = artifacts(["missing adapter/adapter_config.json"], ["8"], ["8"])
    assert not v.passed and "missing adapter/adapter_config.json" in v.detail and v.measured is None


def test_artifacts_gate_fails_when_the_saved_adapter_answers_differently():
    v = artifacts([], ["8", "inin"], ["8", "9"])
    assert not v.passed and v.measured == 0.5 and "1/2 probes" in v.detail and "'inin' vs '9'" in v.detail


def test_artifacts_gate_fails_without_answers_to_compare():
    assert "no probe answers" in artifacts([], ["8"], None).detail
    assert not artifacts([], None, ["8"]).passed
    assert not artifacts([], ["8"], ["8", "9"]).passed
    assert not artifacts([], [], []).passed, "0 of 0 agreeing proves nothing (it passed at 0%)"


# ---------------------------------------------------------------- real tiny training runs

INIT_RANGE = 0.1  # with N(0, 0.02) weights the toy Llama's logits are flat and 12 LoRA steps barely move them
OVERRIDES = ["training.learning_rate=5e-3", "training.iters=12", "training.eval_every=6", "training.save_every=6",
             "lora.rank=8", "lora.scale=10.0", "data.max_seq_length=64"]  # fmt: skip
STOPS = ["<|im_end|>"]
PROBES = 6
MAX_TOKENS = 8


@pytest.fixture(scope="module")
def toy_base(tmp_path_factory, toy_tokenizer) -> Path:
    """The toy Llama and tokenizer as an HF folder, so training loads, and the gates hash, real files."""
    from safetensors.numpy import save_file

    from finetune.models.tiny import tiny_llama_weights
    from tests.conftest import TOY_MODEL_CONFIG

    folder = tmp_path_factory.mktemp("toy-base")
    config = {**TOY_MODEL_CONFIG, "initializer_range": INIT_RANGE}
    save_file(tiny_llama_weights(config, 1), str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps(config))
    toy_tokenizer.save_pretrained(str(folder))
    return folder


class Run:
    def __init__(self, run_dir: Path, steps: int, base: Path, digests: dict[str, str]):
        self.dir, self.steps, self.base, self.digests = run_dir, steps, base, digests


@pytest.fixture(scope="module")
def train(tmp_path_factory, toy_base, sums_dir):
    """train(fault) -> a finished run with that fault planted ("" = healthy); each trained once per module."""
    from finetune.config.loader import load_config, save_config
    from finetune.evaluate.run_measurements import base_file_digests, probe_questions, record_in_memory
    from finetune.train.engine import train_run
    from tests.conftest import plant

    runs: dict[str, Run] = {}

    def get(fault: str = "") -> Run:
        if fault not in runs:
            run_dir = tmp_path_factory.mktemp(fault or "healthy")
            shutil.copytree(sums_dir, run_dir / "data")
            digests = base_file_digests(toy_base)
            with pytest.MonkeyPatch.context() as mp:
                plant(mp, fault)
                cfg = load_config(overrides=OVERRIDES)
                save_config(cfg, run_dir / "config.yaml")
                hook = record_in_memory(run_dir, probe_questions(run_dir / "data", PROBES), STOPS, MAX_TOKENS)
                res = train_run(
                    cfg, toy_base, run_dir / "data", run_dir, on_trained=hook, log=lambda *_: None
                )
            runs[fault] = Run(run_dir, res.steps, toy_base, digests)
        return runs[fault]

    return get


def _loss_gate(run: Run):
    from finetune.train.metrics import read_metrics, train_losses

    return loss_convergence(train_losses(read_metrics(run.dir / "metrics.jsonl")), window=3)


def _parameter_gate(run: Run):
    from finetune.evaluate.run_measurements import adapter_tensors, base_file_digests

    return parameter_updates(adapter_tensors(run.dir / "adapter_init"), adapter_tensors(run.dir / "adapter"),
                             steps=run.steps, base_recorded=run.digests, base_now=base_file_digests(run.base))  # fmt: skip


def _artifacts_gate(run: Run):
    """As the judge stage measures it: run files, then base + SAVED adapter's answers vs the in-memory ones."""
    from finetune.evaluate import decode
    from finetune.evaluate.run_measurements import artifact_problems, in_memory_answers, probe_questions

    problems, disk = artifact_problems(run.dir), None
    try:
        model, tokenizer = decode.load(run.base, run.dir / "adapter")
        prompts = [p.prompt for p in probe_questions(run.dir / "data", PROBES)]
        disk = [a.text for a in decode.greedy(model, tokenizer, prompts, max_tokens=MAX_TOKENS, stops=STOPS)]
    except Exception as exc:
        problems.append(f"base + saved adapter does not load: {exc}")
    return artifacts(problems, disk, in_memory_answers(run.dir))


def test_a_healthy_run_passes_loss_parameter_and_artifact_gates(train):
    run = train("")
    assert _loss_gate(run).passed, str(_loss_gate(run))
    v = _parameter_gate(run)
    assert v.passed and v.measured > 0.8, str(v)
    v = _artifacts_gate(run)
    assert v.passed and v.measured == 1.0, str(v)


def test_lr_zero_fails_the_loss_and_parameter_gates(train):
    run = train("lr_zero")
    assert not _loss_gate(run).passed
    v = _parameter_gate(run)
    assert not v.passed and v.measured == 0.0


def test_frozen_lora_fails_the_parameter_gate(train):
    v = _parameter_gate(train("frozen_lora"))
    assert not v.passed and v.measured == 0.0 and len(v.data["frozen_tensors"]) > 0


def test_one_frozen_adapter_fails_the_parameter_gate_though_most_elements_moved(train):
    v = _parameter_gate(train("one_adapter_frozen"))
    assert not v.passed and v.measured > DEFAULT["lora_params_changed"], str(v)
    assert "adapter tensors never moved" in v.detail and len(v.data["frozen_tensors"]) >= 1, str(v)


def test_a_trained_base_weight_fails_the_parameter_gate(train):
    v = _parameter_gate(train("base_weight_trained"))
    assert not v.passed and len(v.data["base_trained"]) == 1
    assert v.data["base_trained"][0].endswith("norm.weight") and "base tensor(s) were trained" in v.detail


def test_a_changed_base_file_fails_the_parameter_gate(train, tmp_path):
    from finetune.evaluate.run_measurements import adapter_tensors, base_file_digests

    run = train("")
    base = tmp_path / "base"
    shutil.copytree(run.base, base)
    recorded = base_file_digests(base)
    data = bytearray((base / "model.safetensors").read_bytes())
    data[-1] ^= 1  # one bit of one weight, as an in-place update of the base would leave it
    (base / "model.safetensors").write_bytes(bytes(data))
    v = parameter_updates(adapter_tensors(run.dir / "adapter_init"), adapter_tensors(run.dir / "adapter"),
                          steps=run.steps, base_recorded=recorded, base_now=base_file_digests(base))  # fmt: skip
    assert not v.passed and v.data["base_files_moved"] == ["model.safetensors"]


def test_an_adapter_saved_with_scale_zero_fails_the_artifacts_gate(train):
    run = train("adapter_scale_zero")
    assert _parameter_gate(run).passed  # the tensors are fine: only the saved config is wrong
    v = _artifacts_gate(run)
    assert not v.passed and "differ from the in-memory model" in v.detail


def test_a_truncated_adapter_fails_the_artifacts_gate(train):
    v = _artifacts_gate(train("adapter_truncated"))
    assert not v.passed and "truncated" in v.detail


def test_a_missing_run_file_fails_the_artifacts_gate(train, tmp_path):
    run = train("")
    copy = tmp_path / "run"
    shutil.copytree(run.dir, copy)
    (copy / "metrics.jsonl").unlink()
    v = _artifacts_gate(Run(copy, run.steps, run.base, run.digests))
    assert not v.passed and "missing metrics.jsonl" in v.detail


def test_a_gate_declared_by_its_row_compares_its_metric_with_the_threshold():
    from finetune.gates.registry import GATES

    gate = GATES["validation_loss"]
    healthy = declared_gate(gate, {"initial_val_loss": 6.65, "best_val_loss": 4.07}, 0.02)
    assert healthy.passed and healthy.measured == pytest.approx(1 - 4.07 / 6.65)
    flat = declared_gate(gate, {"initial_val_loss": 6.65, "best_val_loss": 6.65}, 0.02)  # lr 0
    assert flat.status == "failed" and flat.measured == 0 and "needs >= 0.02" in flat.detail
    missing = declared_gate(gate, {"steps": 3}, 0.02)
    assert missing.status == "failed" and "best_val_loss" in missing.detail
    nan = declared_gate(gate, {"initial_val_loss": float("nan"), "best_val_loss": 1.0}, 0.02)
    assert nan.status == "failed" and "finite" in nan.detail


# ---------------------------------------------------------------- forgetting


def test_forgetting_passes_within_the_ratio_and_fails_beyond_it():
    from finetune.gates.training import forgetting

    ok = forgetting(3.0, 3.5, texts=12, max_ratio=2.0)
    assert ok.passed and ok.measured == pytest.approx(np.exp(0.5)) and ok.threshold == 2.0
    assert (
        "perplexity on 12 general texts: base 20.09, base + adapter 33.12 (x1.649, needs <= x2)" in ok.detail
    )
    bad = forgetting(3.0, 4.0, texts=12, max_ratio=2.0)
    assert not bad.passed and bad.measured == pytest.approx(np.e)
    assert (
        not forgetting(None, 3.0, texts=12).passed
        and "no general-text perplexity" in forgetting(3.0, None, texts=1).detail
    )
