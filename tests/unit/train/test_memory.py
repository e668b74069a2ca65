"""finetune.train.memory: exact parameter counts against real mlx-lm models, and the estimate's behaviour."""

import json

import mlx.core as mx
import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.tuner.utils import linear_to_lora_layers

from finetune.config.schema import RunConfig
from finetune.train import memory
from finetune.train.memory import ModelShape, compare, estimate, format_estimate, predicted_saving
from finetune.train.setup import prepare_model

TINY = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 160,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 300,
    "rms_norm_eps": 1e-5,
    "tie_word_embeddings": True,
    "torch_dtype": "float32",
}
SMOLLM2 = {
    "model_type": "llama",
    "hidden_size": 576,
    "intermediate_size": 1536,
    "num_hidden_layers": 30,
    "num_attention_heads": 9,
    "num_key_value_heads": 3,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "torch_dtype": "bfloat16",
}
RUN = {"batch_size": 4, "seq_len": 256}


def mlx_model(cfg: dict) -> llama.Model:
    return llama.Model(llama.ModelArgs.from_dict({"rms_norm_eps": 1e-5, **cfg}))


def count(tree) -> int:
    return sum(v.size for _, v in tree_flatten(tree))


# ---------------------------------------------------------------- parameter counts (exact)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"tie_word_embeddings": False},
        {"num_key_value_heads": 4},
        {"head_dim": 24},
        {"attention_bias": True, "mlp_bias": True},
        {"num_hidden_layers": 1, "num_key_value_heads": 1},
    ],
)
def test_param_count_matches_mlx_lm_llama(overrides):
    cfg = {**TINY, **overrides}
    assert ModelShape.from_hf_config(cfg).param_count == count(mlx_model(cfg).parameters())


def test_smollm2_shape_has_its_published_parameter_count():
    shape = ModelShape.from_hf_config(SMOLLM2)
    assert (shape.head_dim, shape.kv_dim, shape.dtype) == (64, 192, "bfloat16")
    assert shape.param_count == 134_515_008  # 134.5M, what transformers reports for SmolLM2-135M


@pytest.mark.parametrize(
    ("fine_tune_type", "num_layers", "keys", "rank"),
    [
        ("lora", -1, None, 8),
        ("lora", 2, None, 8),
        ("lora", 1, ["self_attn.q_proj", "self_attn.v_proj"], 16),
        ("dora", -1, None, 8),
        ("dora", 2, ["mlp.down_proj"], 4),
    ],
)
def test_adapter_params_match_linear_to_lora_layers(fine_tune_type, num_layers, keys, rank):
    model = mlx_model(TINY)
    model.freeze()
    params = {"rank": rank, "dropout": 0.0, "scale": 20.0}
    if keys:
        params["keys"] = keys
    linear_to_lora_layers(model, num_layers, params, use_dora=fine_tune_type == "dora")
    est = estimate(
        ModelShape.from_hf_config(TINY),
        fine_tune_type=fine_tune_type,
        batch_size=1,
        seq_len=8,
        lora_rank=rank,
        lora_num_layers=num_layers,
        lora_keys=keys,
    )
    assert est.trainable_params == count(model.trainable_parameters())
    assert est.total_params == count(model.parameters())


@pytest.mark.parametrize(
    "sets",
    [
        {"training": {"fine_tune_type": "full"}},
        {"training": {"fine_tune_type": "lora"}, "lora": {"rank": 4, "num_layers": 2}},
        {"training": {"fine_tune_type": "dora"}, "lora": {"rank": 8, "keys": ["self_attn.v_proj"]}},
    ],
)
def test_counts_match_what_prepare_model_trains(sets):
    cfg = RunConfig.model_validate(sets)
    model = mlx_model(TINY)
    prepare_model(model, cfg)
    est = memory.from_run_config(TINY, cfg)
    assert est.trainable_params == count(model.trainable_parameters())
    assert est.total_params == count(model.parameters())


# ---------------------------------------------------------------- config parsing errors


@pytest.mark.parametrize("key", ["hidden_size", "num_hidden_layers", "vocab_size", "intermediate_size"])
def test_missing_required_key_is_named(key):
    cfg = {k: v for k, v in TINY.items() if k != key}
    with pytest.raises(ValueError, match=key):
        ModelShape.from_hf_config(cfg)


def test_bad_config_values_are_rejected():
    with pytest.raises(ValueError, match="num_key_value_heads"):
        ModelShape.from_hf_config({**TINY, "num_key_value_heads": 3})
    with pytest.raises(ValueError, match="dtype"):
        ModelShape.from_hf_config({**TINY, "torch_dtype": "int8"})
    with pytest.raises(ValueError, match="integer"):
        ModelShape.from_hf_config({**TINY, "hidden_size": "64"})
    with pytest.raises(ValueError, match="num_layers must be >= 1"):
        ModelShape.from_hf_config({**TINY, "num_hidden_layers": 0})
    with pytest.raises(TypeError):
        ModelShape.from_hf_config(["not", "a", "dict"])


def test_defaults_follow_mlx_lm_and_dtype_spellings():
    shape = ModelShape.from_hf_config(
        {k: v for k, v in TINY.items() if k not in ("tie_word_embeddings", "torch_dtype")}
    )
    assert shape.tie_word_embeddings and shape.dtype == "float32"
    assert ModelShape.from_hf_config({**TINY, "torch_dtype": None, "dtype": "float16"}).dtype == "float16"
    nested = ModelShape.from_hf_config({"model_type": "vlm", "text_config": TINY})
    assert nested.param_count == ModelShape.from_hf_config(TINY).param_count


def test_bad_run_arguments_are_rejected():
    shape = ModelShape.from_hf_config(TINY)
    with pytest.raises(ValueError, match="fine_tune_type"):
        estimate(shape, fine_tune_type="qlora", **RUN)
    with pytest.raises(ValueError, match="optimizer"):
        estimate(shape, fine_tune_type="lora", optimizer="lion", **RUN)
    # more layers than the model has means all of them, as in mlx-lm
    over = estimate(shape, fine_tune_type="lora", lora_num_layers=4, **RUN)
    every = estimate(shape, fine_tune_type="lora", lora_num_layers=-1, **RUN)
    assert over.breakdown == every.breakdown and over.trainable_params == every.trainable_params
    with pytest.raises(ValueError, match="lm_head"):
        estimate(shape, fine_tune_type="lora", lora_keys=["lm_head"], **RUN)
    with pytest.raises(ValueError, match="param_dtype"):
        estimate(shape, fine_tune_type="lora", param_dtype="float64", **RUN)
    with pytest.raises(ValueError, match="batch_size"):
        estimate(shape, fine_tune_type="lora", batch_size=0, seq_len=8)


# ---------------------------------------------------------------- estimate behaviour


@pytest.fixture
def smol() -> ModelShape:
    # float32, as FineTune trains it on CPU (models.packaged converts SmolLM2 to a float32 folder).
    return ModelShape.from_hf_config({**SMOLLM2, "torch_dtype": "float32"})


def total(shape, **kw) -> int:
    return estimate(shape, **{"fine_tune_type": "lora", **RUN, **kw}).total_bytes


def test_breakdown_sums_to_total_and_serializes(smol):
    for kind in ("lora", "dora", "full"):
        est = estimate(smol, fine_tune_type=kind, **RUN)
        assert sum(est.breakdown.values()) == est.total_bytes > 0
        assert set(est.breakdown) == {"weights", "optimizer", "activations", "logits", "gradients"}
        data = json.loads(json.dumps(est.to_dict()))
        assert data["total_bytes"] == est.total_bytes and data["fine_tune_type"] == kind


def test_lora_needs_less_than_full(smol):
    assert total(smol) < total(smol, fine_tune_type="full")
    assert 0 < predicted_saving(smol, **RUN) < 1
    lora, full = total(smol), total(smol, fine_tune_type="full")
    assert predicted_saving(smol, **RUN) == pytest.approx(1 - lora / full)


def test_grows_with_batch_and_sequence_length(smol):
    for kind in ("lora", "full"):
        assert total(smol, fine_tune_type=kind, batch_size=2) < total(smol, fine_tune_type=kind, batch_size=8)
        assert total(smol, fine_tune_type=kind, seq_len=128) < total(smol, fine_tune_type=kind, seq_len=1024)


def test_gradient_checkpointing_lowers_activations(smol):
    plain = estimate(smol, fine_tune_type="lora", **RUN)
    ckpt = estimate(smol, fine_tune_type="lora", grad_checkpoint=True, **RUN)
    assert ckpt.breakdown["activations"] < plain.breakdown["activations"]
    assert ckpt.total_bytes < plain.total_bytes


def test_dora_is_slightly_above_lora(smol):
    lora, dora = total(smol), total(smol, fine_tune_type="dora")
    assert lora < dora < 1.3 * lora


def test_adapting_fewer_layers_needs_less(smol):
    assert total(smol, lora_num_layers=4) < total(smol, lora_num_layers=16) < total(smol)


def test_optimizer_state_counts(smol):
    adam = estimate(smol, fine_tune_type="full", optimizer="adam", **RUN)
    sgd = estimate(smol, fine_tune_type="full", optimizer="sgd", **RUN)
    per_param = smol.param_count * 4
    assert adam.breakdown["optimizer"] == 2 * per_param
    assert sgd.breakdown["optimizer"] == per_param
    lora = estimate(smol, fine_tune_type="lora", **RUN)
    assert lora.breakdown["optimizer"] == 2 * 4 * lora.trainable_params  # adapters are float32


def test_param_dtype_defaults_to_the_model_and_can_be_overridden():
    shape = ModelShape.from_hf_config(SMOLLM2)
    bf16 = estimate(shape, fine_tune_type="full", **RUN)
    f32 = estimate(shape, fine_tune_type="full", param_dtype="float32", **RUN)
    assert bf16.inputs["param_dtype"] == "bfloat16" and f32.inputs["param_dtype"] == "float32"
    assert f32.breakdown["weights"] == 2 * bf16.breakdown["weights"]
    assert f32.breakdown["optimizer"] == 2 * bf16.breakdown["optimizer"]


def test_half_precision_lora_keeps_float32_adapter_inputs():
    """x @ lora_a promotes a bfloat16 input to float32, and the backward pass keeps that copy."""
    shape = ModelShape.from_hf_config(SMOLLM2)
    bf16 = estimate(shape, fine_tune_type="lora", **RUN).breakdown
    f32 = estimate(shape, fine_tune_type="lora", param_dtype="float32", **RUN).breakdown
    assert bf16["weights"] < 0.6 * f32["weights"] and bf16["logits"] == f32["logits"] // 2
    assert 0.6 * f32["activations"] < bf16["activations"] < f32["activations"]


def test_logits_are_vocabulary_sized(smol):
    est = estimate(smol, fine_tune_type="lora", **RUN)
    assert est.breakdown["logits"] == memory.LOGIT_COPIES * RUN["batch_size"] * RUN["seq_len"] * 49152 * 4


def test_full_small_batches_peak_at_the_update(smol):
    assert estimate(smol, fine_tune_type="full", batch_size=1, seq_len=32).peak_phase == "update"
    assert estimate(smol, fine_tune_type="lora", batch_size=1, seq_len=32).peak_phase == "loss"


def test_compare_reports_signed_error():
    est = estimate(ModelShape.from_hf_config(TINY), fine_tune_type="lora", **RUN)
    over = compare(est, est.total_bytes // 2)
    assert over.error_pct == pytest.approx(100, abs=0.01) and not over.within(15)
    exact = compare(est, est.total_bytes)
    assert exact.error_pct == 0 and exact.within()
    assert compare(est, int(est.total_bytes * 1.1)).error_pct < 0
    with pytest.raises(ValueError, match="measured peak"):
        compare(est, 0)


def test_format_estimate_lists_components_and_total(smol):
    text = format_estimate(estimate(smol, fine_tune_type="lora", **RUN))
    for word in ("weights", "optimizer", "activations", "logits", "gradients", "total", "MiB", "trainable"):
        assert word in text


def test_from_run_config_uses_the_run(smol):
    cfg = RunConfig.model_validate(
        {
            "data": {"max_seq_length": 256},
            "training": {"batch_size": 4, "fine_tune_type": "dora"},
            "lora": {"rank": 4, "num_layers": 8},
        }
    )
    est = memory.from_run_config({**SMOLLM2, "torch_dtype": "float32"}, cfg)
    direct = estimate(smol, fine_tune_type="dora", lora_rank=4, lora_num_layers=8, **RUN)
    assert est.total_bytes == direct.total_bytes and est.fine_tune_type == "dora"


# ---------------------------------------------------------------- one tiny measured step


def test_tiny_measured_lora_step_is_near_the_estimate():
    """A real MLX step on a small random Llama (~1 s); the full calibration is bench/calibrate_memory.py."""
    import mlx.nn as nn
    import mlx.optimizers as optim

    from finetune.train.batches import masked_loss

    cfg = {**TINY, "hidden_size": 128, "intermediate_size": 384, "num_hidden_layers": 2, "vocab_size": 4096}
    batch, seq = 2, 128
    mx.random.seed(0)
    model = mlx_model(cfg)
    model.freeze()
    linear_to_lora_layers(model, -1, {"rank": 8, "dropout": 0.0, "scale": 20.0})
    opt = optim.Adam(learning_rate=1e-4)
    step = nn.value_and_grad(model, masked_loss)
    ids = mx.arange(batch * (seq + 1)).reshape(batch, seq + 1) % cfg["vocab_size"]
    mask = mx.ones(ids.shape)
    mx.eval(model.parameters())
    mx.clear_cache()
    mx.reset_peak_memory()
    for _ in range(2):
        (loss, _), grads = step(model, ids, mask)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
    est = estimate(ModelShape.from_hf_config(cfg), fine_tune_type="lora", batch_size=batch, seq_len=seq)
    assert compare(est, mx.get_peak_memory()).within(15)
