"""The gate registry agrees with the gates, their thresholds, the faults meant for them and the tiers."""

from __future__ import annotations

import numpy as np

from finetune import faults
from finetune.config.schema import GatesConfig
from finetune.gates import data, export, runtimes, served, training
from finetune.gates.parity import Answer, ParityResult
from finetune.gates.registry import GATES, Gate


def _every_gate_verdict():
    """One verdict from each gate function, on minimal inputs."""
    a = [Answer("x", "stop")]
    return [
        training.loss_convergence([1.0] * 4, window=2),
        training.model_learning(["a"], ["b"], ["b"], loss_before=1, loss_after=0),
        training.memory_efficiency(1, 2),
        training.parameter_updates(
            {"l.lora_a": np.zeros(2)},
            {"l.lora_a": np.ones(2)},
            steps=3,
            base_recorded={"f": "1"},
            base_now={"f": "1"},
        ),
        training.artifacts([], ["a"], ["a"]),
        data.label_mask([], mask_prompt=True),
        export.fuse_exactness(export.FuseMeasurement({}, {}, []), max_rel=1e-3),
        runtimes.tokenizer_gate(["a"], [[1]], [[1]]),
        runtimes.logprob_gate(ParityResult(True, [], {}), gguf_type="f16", max_abs=0.1),
        runtimes.output_parity({"r": a}, reference="r", thresholds={}),
        runtimes.adapter_effect(a, {"t": a}, ["x"]),
        runtimes.clean_endings({"t": a}),
        served.served_answers(a, a, ["x"], threshold=0.9),
        served.served_template("t", [], "t", [], {}),
        served.served_api([]),
    ]


def test_every_gate_function_reports_a_registered_name():
    names = [v.name for v in _every_gate_verdict()]
    assert sorted(names) == sorted(GATES)  # one function per registered gate, and no unregistered one


def test_registry_keys_are_the_gate_names_and_every_entry_is_explained():
    for key, gate in GATES.items():
        assert isinstance(gate, Gate) and gate.name == key
        assert gate.measures.strip() and gate.why.strip(), key


def test_every_threshold_is_a_gates_config_key():
    fields = set(GatesConfig.model_fields)
    for gate in GATES.values():
        assert gate.threshold == "-" or gate.threshold in fields, (gate.name, gate.threshold)


def test_every_planted_fault_is_caught_by_a_registered_gate():
    for fault, (_stage, where, gate) in faults.FAULTS.items():
        assert where.strip(), fault
        assert gate in GATES or gate == "(stage error)", (fault, gate)


def test_the_tiers_require_registered_gates_only():
    from finetune.tiers.tiers import GATE_STAGES, TIERS

    for tier in TIERS.values():
        assert set(tier.required_gates) <= set(GATES), tier.name
    assert set(GATE_STAGES) <= set(GATES)
