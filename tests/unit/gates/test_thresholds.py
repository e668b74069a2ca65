"""The gates' numbers: each is a validated config field with its default and bounds, and each is some gate's."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from finetune.config.schema import GatesConfig
from finetune.gates.registry import GATES
from finetune.gates.thresholds import THRESHOLDS


def test_every_threshold_is_a_config_field_with_its_default_and_a_gate_that_uses_it():
    used = {g.threshold for g in GATES.values()}
    for t in THRESHOLDS:
        assert getattr(GatesConfig(), t.key) == t.default, t.key
        assert t.key in used or t.key.startswith("quant_"), f"{t.key}: no gate compares with it"


@pytest.mark.parametrize("t", [t for t in THRESHOLDS if t.le is not None], ids=lambda t: t.key)
def test_a_share_above_one_is_refused(t):
    with pytest.raises(ValidationError, match=t.key):
        GatesConfig(**{t.key: t.le + 1})
