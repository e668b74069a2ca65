"""The gates on real (tiny) training runs: a healthy run passes; lr=0, frozen adapters, a mutated
base weight and a missing file each fail the gate that should catch them."""

from pathlib import Path

from mlx_lm.tuner.utils import load_adapters

from finetune import probe
from finetune.config import load_config
from finetune.train import train_run
from finetune.validate import artifacts, loss_convergence, parameter_updates, read_metrics, train_losses
from tests.conftest import build_toy_model


def run(tmp_path, sums_dir, toy_tokenizer, lr: float, freeze_adapters: bool = False):
    cfg = load_config(overrides=[f"training.learning_rate={lr}", "training.iters=12", "training.eval_every=6",
                                 "training.save_every=6", "lora.rank=4", "lora.scale=2.0", "data.max_seq_length=64"])  # fmt: skip
    seen = {}

    def before(model):
        if freeze_adapters:  # a broken engine: adapters attached, but only one of them trainable
            model.freeze()
            model.model.layers[-1].self_attn.q_proj.unfreeze(keys=["lora_a", "lora_b"], recurse=False)
        seen["lora"], seen["base"] = probe.lora_snapshot(model), probe.base_snapshot(model)
        seen["model"] = model

    res = train_run(cfg, Path("toy"), sums_dir, tmp_path, load=lambda _p: (build_toy_model(seed=1), toy_tokenizer),
                    on_ready=before, log=lambda *_: None)  # fmt: skip
    model = seen["model"]
    losses = train_losses(read_metrics(tmp_path / "metrics.jsonl"))
    return res, model, seen, losses


def test_healthy_run_passes_loss_and_parameter_gates(tmp_path, sums_dir, toy_tokenizer):
    res, model, seen, losses = run(tmp_path, sums_dir, toy_tokenizer, lr=5e-3)
    assert loss_convergence(losses, window=3).passed
    v = parameter_updates(seen["lora"], probe.lora_snapshot(model), seen["base"], probe.base_snapshot(model),
                          steps=res.steps)  # fmt: skip
    assert v.passed, str(v)


def test_lr_zero_fails_loss_and_parameter_gates(tmp_path, sums_dir, toy_tokenizer):
    res, model, seen, losses = run(tmp_path, sums_dir, toy_tokenizer, lr=0.0)
    assert not loss_convergence(losses, window=3).passed
    v = parameter_updates(seen["lora"], probe.lora_snapshot(model), seen["base"], probe.base_snapshot(model),
                          steps=res.steps)  # fmt: skip
    assert not v.passed and v.measured == 0.0


def test_frozen_adapters_fail_the_parameter_gate(tmp_path, sums_dir, toy_tokenizer):
    res, model, seen, _ = run(tmp_path, sums_dir, toy_tokenizer, lr=5e-3, freeze_adapters=True)
    v = parameter_updates(seen["lora"], probe.lora_snapshot(model), seen["base"], probe.base_snapshot(model),
                          steps=res.steps)  # fmt: skip
    assert not v.passed and 0 < v.measured < 0.1


def test_mutated_base_weight_fails_the_parameter_gate(tmp_path, sums_dir, toy_tokenizer):
    import mlx.core as mx

    res, model, seen, _ = run(tmp_path, sums_dir, toy_tokenizer, lr=5e-3)
    layer = model.model.layers[0].mlp.down_proj.linear
    layer.weight = layer.weight + mx.array(1e-3)  # what a leaking optimizer update would do
    v = parameter_updates(seen["lora"], probe.lora_snapshot(model), seen["base"], probe.base_snapshot(model),
                          steps=res.steps)  # fmt: skip
    assert not v.passed and v.data["base_moved"] == ["model.layers.0.mlp.down_proj.linear.weight"]


def test_artifacts_gate_loads_the_real_adapter_and_fails_on_a_missing_file(tmp_path, sums_dir, toy_tokenizer):
    run(tmp_path, sums_dir, toy_tokenizer, lr=5e-3)

    def load(adapter_dir):
        return load_adapters(build_toy_model(seed=1), str(adapter_dir))

    assert artifacts(tmp_path, load_adapter=load, require_summary=False).passed
    (tmp_path / "adapter/adapters.safetensors").write_bytes(b"truncated")
    broken = artifacts(tmp_path, load_adapter=load, require_summary=False)
    assert not broken.passed and "adapter does not load" in broken.detail
    (tmp_path / "metrics.jsonl").unlink()
    assert "missing metrics.jsonl" in artifacts(tmp_path, require_summary=False).detail
