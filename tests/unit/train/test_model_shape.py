"""finetune.train.model_shape: exact parameter counts (model and adapters) against mlx-lm's own modules."""

import pytest
from mlx.utils import tree_flatten
from mlx_lm.models import llama
from mlx_lm.tuner.utils import linear_to_lora_layers

from finetune.config.schema import RunConfig
from finetune.train import memory
from finetune.train.model_shape import ModelShape, adapter_param_count
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
    shape = ModelShape.from_hf_config(TINY)
    added = adapter_param_count(
        shape, rank=rank, keys=keys, num_layers=num_layers, dora=fine_tune_type == "dora"
    )
    assert added == count(model.trainable_parameters())
    assert shape.param_count + added == count(model.parameters())


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
