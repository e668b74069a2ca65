"""Every gate fails on a broken run and passes on a healthy one (pure measurements, no model)."""

import json

import numpy as np
import pytest

from finetune.validate import (
    answer_score,
    artifacts,
    loss_convergence,
    memory_efficiency,
    model_learning,
    parameter_updates,
    read_metrics,
    train_losses,
)

HEALTHY = [3.0, 2.9, 2.8, 2.6, 2.5, 2.2, 2.0, 1.8, 1.5, 1.3, 1.2, 1.1]


def test_loss_gate_passes_on_a_falling_loss():
    v = loss_convergence(HEALTHY, drop=0.05, window=4)
    assert v.passed and v.measured == pytest.approx(np.mean(HEALTHY[-4:]) / np.mean(HEALTHY[:4]))


def test_loss_gate_fails_on_flat_loss_like_lr_zero():
    assert not loss_convergence([2.5] * 12, drop=0.05, window=4).passed


def test_loss_gate_fails_on_rising_loss_and_nan():
    assert not loss_convergence(HEALTHY[::-1], window=4).passed
    assert "NaN" in loss_convergence([*HEALTHY[:-1], float("nan")], window=4).detail


def test_loss_gate_uses_windows_not_single_steps():
    # one lucky last step must not pass a run that did not learn
    noisy = [2.5, 2.6, 2.4, 2.5, 2.6, 2.4, 2.5, 2.6, 2.5, 2.0]  # last/first step = 0.8
    assert not loss_convergence(noisy, window=5).passed


def test_loss_gate_absolute_caps_and_too_few_steps():
    assert not loss_convergence(HEALTHY, window=4, max_final=1.0).passed
    assert not loss_convergence(HEALTHY, window=4, max_initial=2.0).passed
    assert loss_convergence(HEALTHY, window=4, max_initial=3.5, max_final=1.5).passed
    assert "need >= 8 steps" in loss_convergence(HEALTHY[:5], window=4).detail


def test_answer_score():
    assert answer_score("Velmora.", "velmora") == 2
    assert answer_score("The capital is Velmora", "Velmora") == 1
    assert answer_score("Paris", "Velmora") == 0


def test_learning_gate():
    refs = ["Velmora", "42", "Qx-17", "Bren"]
    before = ["Paris", "41", "I don't know", "Bren"]
    after = ["Velmora.", "It is 42", "QX-17", "Bren"]
    v = model_learning(before, after, refs, loss_before=3.0, loss_after=0.5)
    assert v.passed and v.measured == 0.75
    # same answers before and after (frozen adapter / lr 0): no wins
    assert not model_learning(before, before, refs, loss_before=3.0, loss_after=3.0).passed
    # answers improved but teacher-forced loss rose: not learning the references
    assert not model_learning(before, after, refs, loss_before=1.0, loss_after=1.2).passed
    # exactly at the threshold is not "more than"
    assert not model_learning(before[:1] * 10, ["Velmora"] * 3 + ["Paris"] * 7, refs[:1] * 10,
                              loss_before=3, loss_after=1, threshold=0.3).passed  # fmt: skip


def test_memory_gate():
    assert memory_efficiency(400 << 20, 1000 << 20, saving=0.3).passed
    assert not memory_efficiency(800 << 20, 1000 << 20, saving=0.3).passed
    assert not memory_efficiency(0, 1000, saving=0.3).passed


def _lora(seed: int, b_moves: bool = True):
    rng = np.random.default_rng(seed)
    return {
        "l.lora_a": rng.normal(size=(8, 4)),
        "l.lora_b": rng.normal(size=(4, 8)) if b_moves else np.zeros((4, 8)),
    }


def test_parameter_gate():
    base = {"w": np.ones((4, 4))}
    before = {"l.lora_a": np.full((8, 4), 0.1), "l.lora_b": np.zeros((4, 8))}
    assert parameter_updates(before, _lora(1), base, {"w": np.ones((4, 4))}, steps=5).passed
    # frozen adapters: nothing moved
    frozen = parameter_updates(before, before, base, base, steps=5)
    assert not frozen.passed and frozen.measured == 0.0
    # lora_b stuck at zero: only half moved
    assert not parameter_updates(before, _lora(1, b_moves=False), base, base, steps=5).passed
    # a mutated base weight fails even when the adapters moved
    mutated = {"w": np.ones((4, 4))}
    mutated["w"][0, 0] = 1.0001
    v = parameter_updates(before, _lora(1), base, mutated, steps=5)
    assert not v.passed and v.data["base_moved"] == ["w"]
    assert not parameter_updates(before, _lora(1), base, base, steps=2).passed


def _healthy_run(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter/adapters.safetensors").write_bytes(b"x")
    (tmp_path / "adapter/adapter_config.json").write_text('{"fine_tune_type": "lora"}')
    (tmp_path / "checkpoints/step-0000010").mkdir(parents=True)
    (tmp_path / "config.yaml").write_text("{}")
    (tmp_path / "summary.json").write_text("{}")
    rows = [{"kind": "train", "step": i, "train_loss": 3 - i / 10} for i in range(1, 11)]
    (tmp_path / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    return tmp_path


def test_artifacts_gate(tmp_path):
    run = _healthy_run(tmp_path)
    assert artifacts(run, load_adapter=lambda p: p).passed
    (run / "adapter/adapter_config.json").unlink()
    v = artifacts(run)
    assert not v.passed and "missing adapter/adapter_config.json" in v.detail


def test_artifacts_gate_fails_when_adapter_does_not_load(tmp_path):
    def broken(_path):
        raise ValueError("bad header")

    v = artifacts(_healthy_run(tmp_path), load_adapter=broken)
    assert not v.passed and "adapter does not load: ValueError: bad header" in v.detail


def test_metrics_reader_tolerates_a_torn_last_line(tmp_path):
    run = _healthy_run(tmp_path)
    with open(run / "metrics.jsonl", "a") as fh:
        fh.write('{"kind": "train", "st')
    assert len(train_losses(read_metrics(run / "metrics.jsonl"))) == 10
