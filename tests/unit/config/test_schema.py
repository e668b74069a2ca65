"""finetune.config.schema: the typed run configuration on its own (no YAML): defaults, ranges, alpha/scale."""

import json

import pytest
from pydantic import ValidationError

from finetune.config.schema import (
    DataConfig,
    GatesConfig,
    LoraConfig,
    RunConfig,
    TrainingConfig,
)


def test_defaults_are_valid_and_plain_json():
    cfg = RunConfig()
    data = cfg.to_dict()
    assert json.loads(json.dumps(data)) == data
    assert RunConfig.model_validate(data) == cfg
    assert data["data"]["splits"] == [0.8, 0.1, 0.1]  # tuples dump as JSON lists
    assert cfg.training.fine_tune_type == "lora" and cfg.lora.num_layers == -1


@pytest.mark.parametrize(
    ("given", "scale", "alpha"),
    [
        ({"rank": 16, "alpha": 32}, 2.0, 32.0),
        ({"rank": 8, "scale": 4}, 4.0, 32.0),
        ({"alpha": 16}, 2.0, 16.0),  # rank defaults to 8
        ({"rank": 4, "alpha": None, "scale": 3}, 3.0, 12.0),  # an explicit null alpha is ignored
    ],
)
def test_alpha_converts_to_scale(given, scale, alpha):
    lora = LoraConfig.model_validate(given)
    assert lora.scale == scale and lora.alpha == alpha
    assert "alpha" not in lora.model_dump()  # one stored setting: scale


def test_alpha_and_scale_together_is_refused():
    with pytest.raises(ValidationError, match="give either scale .* or alpha .*not both"):
        LoraConfig.model_validate({"rank": 8, "alpha": 16, "scale": 2})


@pytest.mark.parametrize(
    ("section", "values", "field"),
    [
        (LoraConfig, {"num_layers": 0}, "num_layers must be -1"),
        (LoraConfig, {"num_layers": -2}, "num_layers"),
        (LoraConfig, {"rank": 0}, "rank"),
        (LoraConfig, {"scale": 0}, "scale"),
        (LoraConfig, {"dropout": 1.0}, "dropout"),
        (DataConfig, {"splits": [0.5, 0.6, -0.1]}, "three shares above 0"),
        (DataConfig, {"splits": [0.5, 0.1, 0.1]}, "summing to 1"),
        (DataConfig, {"max_seq_length": 4}, "max_seq_length"),
        (DataConfig, {"template": "vicuna"}, "template"),
        (TrainingConfig, {"fine_tune_type": "qlora"}, "fine_tune_type"),
        (TrainingConfig, {"learning_rate": -1e-4}, "learning_rate"),
        (TrainingConfig, {"iters": 0}, "iters"),
        (TrainingConfig, {"val_batches": -2}, "val_batches"),
        (GatesConfig, {"loss_drop": 1.0}, "loss_drop"),
    ],
)
def test_out_of_range_values_are_refused(section, values, field):
    with pytest.raises(ValidationError, match=field):
        section.model_validate(values)


def test_unknown_keys_are_refused_in_every_section():
    for section in (RunConfig, LoraConfig, DataConfig, TrainingConfig, GatesConfig):
        with pytest.raises(ValidationError, match="Extra inputs are not permitted"):
            section.model_validate({"colour": "red"})


def test_assignment_is_validated():
    cfg = RunConfig()
    cfg.training.fine_tune_type = "full"  # what the peak-memory measurement does
    assert cfg.training.fine_tune_type == "full"
    with pytest.raises(ValidationError, match="fine_tune_type"):
        cfg.training.fine_tune_type = "qlora"
    with pytest.raises(ValidationError, match="rank"):
        cfg.lora.rank = 0


def test_every_gate_threshold_says_what_it_catches():
    for name, field in GatesConfig.model_fields.items():
        assert field.description, f"gates.{name} has no description"
