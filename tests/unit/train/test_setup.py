"""finetune.train.setup: adapters attached (or everything trainable), adapter_config.json, and the optimizer."""

import mlx.core as mx
import mlx.optimizers as optim
import pytest
from mlx.utils import tree_flatten

from finetune.config.loader import load_config
from finetune.train.setup import adapter_config, make_optimizer, prepare_model
from tests.conftest import build_toy_model


def cfg(*sets):
    return load_config(overrides=["lora.rank=4", "lora.scale=2.0", *sets])


def trainable_names(model) -> list[str]:
    return sorted(k for k, _ in tree_flatten(model.trainable_parameters()))


def count(tree) -> int:
    return sum(v.size for _, v in tree_flatten(tree))


def test_adapter_config_is_what_mlx_lm_load_needs():
    assert adapter_config(cfg(), 2) == {
        "fine_tune_type": "lora",
        "num_layers": 2,
        "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0},
    }
    assert adapter_config(cfg("lora.num_layers=8"), 2)["num_layers"] == 2  # more than the depth: all blocks
    assert adapter_config(cfg("lora.num_layers=1"), 2)["num_layers"] == 1
    full = adapter_config(cfg("lora.num_layers=1", "training.fine_tune_type=full"), 30)
    assert full["num_layers"] == 30 and full["fine_tune_type"] == "full"
    keys = adapter_config(cfg("lora.keys=[self_attn.q_proj]"), 2)["lora_parameters"]
    assert keys["keys"] == ["self_attn.q_proj"]


def test_lora_freezes_the_base_and_adapts_the_top_layers():
    model = build_toy_model()
    acfg = prepare_model(model, cfg("lora.num_layers=1"))
    names = trainable_names(model)
    assert names and all(".lora_a" in n or ".lora_b" in n for n in names)
    assert all(n.startswith("model.layers.1.") for n in names)  # the last block only
    assert acfg["num_layers"] == 1


def test_full_trains_every_parameter_and_dora_adds_magnitudes():
    full = build_toy_model()
    prepare_model(full, cfg("training.fine_tune_type=full"))
    assert count(full.trainable_parameters()) == count(full.parameters())
    dora = build_toy_model()
    prepare_model(dora, cfg("training.fine_tune_type=dora"))
    assert any(n.endswith(".m") for n in trainable_names(dora))


def test_base_weight_trained_fault_leaves_one_norm_weight_trainable(plant_fault):
    plant_fault("base_weight_trained")
    model = build_toy_model()
    prepare_model(model, cfg())
    (base,) = [n for n in trainable_names(model) if ".lora_" not in n]  # exactly one base tensor
    assert base.endswith("norm.weight")
    plant_fault()
    healthy = build_toy_model()
    prepare_model(healthy, cfg())
    assert all(".lora_" in n for n in trainable_names(healthy))


def test_lora_trains_everything_fault_leaves_the_whole_base_trainable(plant_fault):
    plant_fault("lora_trains_everything")
    model = build_toy_model()
    prepare_model(model, cfg())
    names = trainable_names(model)
    assert any(".lora_" in n for n in names) and "model.embed_tokens.weight" in names


def learning_rates(opt, steps):
    """The learning rate each of the first `steps` updates used."""
    params, out = {"w": mx.zeros((2,))}, []
    for _ in range(steps):
        params = opt.apply_gradients({"w": mx.zeros((2,))}, params)
        out.append(round(float(opt.learning_rate), 6))
    return out


def fresh(cfg_):
    opt = make_optimizer(cfg_)
    opt.init({"w": mx.zeros((2,))})
    return opt


def test_schedules_and_warmup():
    constant = fresh(cfg("training.learning_rate=0.1"))
    assert learning_rates(constant, 3) == [0.1, 0.1, 0.1]
    warm = fresh(cfg("training.learning_rate=0.1", "training.warmup_steps=2"))
    assert learning_rates(warm, 4) == [0.0, 0.05, 0.1, 0.1]
    linear = fresh(cfg("training.learning_rate=0.1", "training.lr_schedule=linear", "training.iters=4"))
    assert learning_rates(linear, 5) == [0.1, 0.075, 0.05, 0.025, 0.0]
    cosine = learning_rates(fresh(cfg("training.learning_rate=0.1", "training.lr_schedule=cosine",
                                      "training.iters=4")), 5)  # fmt: skip
    assert cosine[0] == 0.1 and cosine == sorted(cosine, reverse=True) and cosine[-1] < 0.01


def test_optimizer_kinds():
    assert type(make_optimizer(cfg())) is optim.Adam
    adamw = make_optimizer(cfg("training.optimizer=adamw", "training.weight_decay=0.01"))
    assert type(adamw) is optim.AdamW and adamw.weight_decay == 0.01
    assert type(make_optimizer(cfg("training.optimizer=sgd"))) is optim.SGD


def test_lr_zero_fault(plant_fault):
    plant_fault("lr_zero")
    opt = fresh(cfg("training.learning_rate=0.1", "training.warmup_steps=2"))
    assert learning_rates(opt, 3) == [0.0, 0.0, 0.0]


@pytest.mark.parametrize("sets", [["training.warmup_steps=2"], ["training.lr_schedule=cosine"], []])
def test_lr_too_high_fault_multiplies_every_step_s_rate_by_ten(plant_fault, sets):
    healthy = learning_rates(fresh(cfg("training.learning_rate=0.01", *sets)), 3)
    plant_fault("lr_too_high")
    # learning_rates rounds to 6 decimals: 10x a rounded rate is within 10 x 5e-7 of the rounded 10x rate
    hot = learning_rates(fresh(cfg("training.learning_rate=0.01", *sets)), 3)
    assert hot == pytest.approx([10 * r for r in healthy], abs=10 * 5e-7 + 5e-7)


@pytest.mark.parametrize("fault", ["", "frozen_lora"])
def test_frozen_lora_fault_zeroes_every_update(plant_fault, fault):
    plant_fault(fault)
    opt = make_optimizer(cfg("training.learning_rate=0.1", "training.optimizer=sgd"))
    params = {"w": mx.ones((3,))}
    new = opt.apply_gradients({"w": mx.ones((3,))}, params)
    moved = float(mx.abs(new["w"] - params["w"]).max())
    assert (moved == 0.0) if fault else moved == pytest.approx(0.1)
