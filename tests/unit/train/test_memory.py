"""finetune.train.memory: exact parameter counts against real mlx-lm models, and the estimate's behaviour."""

import gc
import json

import mlx.core as mx
import pytest
from mlx_lm.tuner.utils import linear_to_lora_layers

from finetune.config.schema import RunConfig
from finetune.train import memory
from finetune.train.memory import ModelShape, compare, estimate, format_estimate, predicted_saving
from tests.unit.train.test_model_shape import SMOLLM2, TINY, mlx_model

RUN = {"batch_size": 4, "seq_len": 256}


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
    # arrays other tests keep alive (session fixtures) count in MLX's peak: measure above them
    gc.collect()
    before = mx.get_active_memory()
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
    assert compare(est, mx.get_peak_memory() - before).within(15)


def test_a_rank_is_priced_with_its_share_of_the_batch_and_everything_else_whole():
    from finetune.config.loader import load_config
    from finetune.train.memory import from_run_config, per_rank_batch

    config = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
              "intermediate_size": 1536, "vocab_size": 49152}  # fmt: skip
    two = from_run_config(config, load_config(overrides=["training.batch_size=4", "training.ranks=2"]))
    half = from_run_config(config, load_config(overrides=["training.batch_size=2"]))
    assert two.total_bytes == half.total_bytes and two.inputs["batch_size"] == 2
    assert [per_rank_batch(4, n) for n in (1, 2, 3, 4)] == [4, 2, 2, 1]  # rank 0's share is the largest


def test_trimmed_batches_are_priced_up_to_the_last_trained_token_not_the_longest_row():
    from finetune.config.loader import load_config
    from finetune.train.memory import from_run_config

    config = {"hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9, "num_key_value_heads": 3,
              "intermediate_size": 1536, "vocab_size": 49152}  # fmt: skip
    # long prompts with the answer early or cut off by max_seq_length: rows of 600 tokens, trained up to 400
    data = {"length_unit": "tokens", "length_stats": {"max": 600},
            "trained_tokens": {"max": 14, "positions": 9000, "last": 400}}  # fmt: skip
    cfg = load_config(overrides=["data.max_seq_length=512"])
    assert from_run_config(config, cfg, data).inputs["seq_len"] == 400
    untrimmed = load_config(overrides=["data.max_seq_length=512", "training.trim_batches=false"])
    assert from_run_config(config, untrimmed, data).inputs["seq_len"] == 512
    older = {**data, "trained_tokens": {"max": 14, "positions": 9000}}  # a report from before "last"
    assert from_run_config(config, cfg, older).inputs["seq_len"] == 512
