"""The fault hook: named faults only, read from FT_INJECT_FAULT, each naming the gate that must catch it."""

from __future__ import annotations

import pytest

from finetune import faults
from finetune.gates.registry import GATES


def test_injected_reads_a_comma_separated_list_and_refuses_unknown_names():
    assert faults.injected({}) == []
    assert faults.injected({faults.ENV: "lr_zero, adapter_truncated"}) == ["lr_zero", "adapter_truncated"]
    with pytest.raises(ValueError, match="unknown fault"):
        faults.injected({faults.ENV: "lr_zer0"})


def test_active_follows_the_environment(monkeypatch):
    monkeypatch.setenv(faults.ENV, "frozen_lora")
    assert faults.active("frozen_lora") and not faults.active("lr_zero")
    with pytest.raises(KeyError):
        faults.active("no_such_fault")


def test_every_fault_names_a_real_gate_or_a_stage_error():
    stages = {"train", "fuse", "gguf", "ollama", "evaluate"}
    for name, (stage, where, gate) in faults.FAULTS.items():
        assert stage in stages and where and (gate in GATES or gate == "(stage error)"), name
