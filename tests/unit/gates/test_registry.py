"""The gate registry agrees with the gates, their thresholds, the faults meant for them and the tiers."""

from __future__ import annotations

import numpy as np

from finetune import faults
from finetune.config.schema import GatesConfig
from finetune.evaluate.adapter_measure import AdapterMeasurement
from finetune.evaluate.quant_measure import QuantMeasurement
from finetune.evaluate.served_adapter import ServedAdapterMeasurement
from finetune.gates import (
    adapter_parity,
    fuse,
    generalization,
    label_mask,
    quant_quality,
    runtime_parity,
    served,
    split_overlap,
    training,
)
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
        training.forgetting(1.0, 1.0, texts=1),
        label_mask.label_mask([], mask_prompt=True),
        split_overlap.split_overlap({"train": []}),
        fuse.fuse_exactness(fuse.FuseMeasurement({}, {}, []), max_rel=1e-3),
        runtime_parity.tokenizer_gate(["a"], [[1]], [[1]]),
        runtime_parity.logprob_gate(ParityResult(True, [], {}), gguf_type="f16", max_abs=0.1),
        runtime_parity.output_parity({"r": a}, reference="r", thresholds={}),
        runtime_parity.adapter_effect(a, {"t": a}, ["x"]),
        generalization.heldout_score([], {}),
        runtime_parity.clean_endings({"t": a}),
        served.served_answers(a, a, ["x"], threshold=0.9),
        served.served_template("t", [], "t", [], {}),
        served.served_defaults(
            {}, {}, trained_context=1, model_context=None, longest_answer=1, api_answers=a, openai=None
        ),  # fmt: skip
        served.served_api([]),
        adapter_parity.peft_parity(AdapterMeasurement(1e-5, 1e-5, 1.0, 1)),
        adapter_parity.gguf_lora_parity(AdapterMeasurement(1e-5, 1e-5, 1.0, 1)),
        adapter_parity.served_adapter(ServedAdapterMeasurement(1, 1, 1, 1)),
        adapter_parity.adapters_separate({"a": 1.0}, {"a": {}}),
        quant_quality.quant_types([], "q8_0", 1),
        quant_quality.quant_quality(
            QuantMeasurement(0, 0, 1, 1, 1, 1, 1, 1), "q8_0", quant_quality.limits_from(None)
        ),
        quant_quality.quant_answers({"f16": {"train": 1.0}, "q8_0": {"train": 1.0}}, "q8_0", 0.75),
    ]


def test_every_gate_function_reports_a_registered_name():
    names = [v.name for v in _every_gate_verdict()]
    declared = [g.name for g in GATES.values() if g.metric]  # judged from their row alone
    assert sorted(names + declared) == sorted(GATES)  # one function per other gate, and no unregistered one
    assert all(GATES[n].phase == "training" for n in declared)


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


def test_the_commands_require_what_the_table_declares():
    """The lists derived from the table are the ones the commands had when each was written by hand."""
    from finetune.gates.registry import LOWER_IS_BETTER, PARITY_GATES, RUNTIME_OF
    from finetune.recipes.commands import COMMANDS

    training = ("loss_convergence", "model_learning", "memory_efficiency", "parameter_updates", "artifacts",
                "label_mask", "split_overlap", "validation_loss", "forgetting")  # fmt: skip
    shipping = ("fuse_exactness", "gguf_tokenizer", "logprob_parity", "output_parity", "adapter_effect",
                "heldout_score", "clean_endings", "served_answers", "served_template", "served_defaults",
                "served_api")  # fmt: skip
    assert COMMANDS["run"].gates == COMMANDS["validate"].gates == training
    assert COMMANDS["pipeline"].gates == (*training[:1], *training[3:], *shipping)
    assert COMMANDS["train"].gates == ()
    assert RUNTIME_OF == {"gguf_tokenizer": "llamacpp", "logprob_parity": "llamacpp", "served_answers": "ollama",
                          "served_template": "ollama", "served_defaults": "ollama", "served_api": "ollama", "served_adapter": "ollama", "quant_types": "ollama", "quant_quality": "ollama", "quant_answers": "ollama"}  # fmt: skip
    assert {
        "loss_convergence",
        "split_overlap",
        "forgetting",
        "logprob_parity",
        "fuse_exactness",
        "peft_parity",
        "gguf_lora_parity",
        "adapters_separate",
        "quant_types",
        "quant_quality",
    } == LOWER_IS_BETTER
    assert PARITY_GATES == (
        "peft_parity",
        "gguf_lora_parity",
        "served_adapter",
        "quant_quality",
        "logprob_parity",
        "output_parity",
        "served_answers",
    )


def test_the_readme_gate_table_lists_every_gate_with_its_threshold_and_default():
    import re
    from pathlib import Path

    from finetune.gates.registry import DEFAULT

    readme = (Path(__file__).resolve().parents[3] / "README.md").read_text()
    table = readme.split("| gate | measures | threshold (`gates.`) | why it exists |", 1)[1].split("\n\n", 1)[
        0
    ]
    rows = dict(re.findall(r"^\| `(\w+)` \| [^|]+ \| ([^|]+) \|", table, flags=re.M))
    assert sorted(rows) == sorted(GATES)
    for name, gate in GATES.items():
        cell = rows[name].strip()
        if gate.threshold in DEFAULT:
            key, default = cell.split()[:2]
            assert key == f"`{gate.threshold}`" and float(default) == DEFAULT[gate.threshold], (name, cell)
        else:
            assert cell.startswith(f"`{gate.threshold}`" if gate.threshold != "-" else "-"), (name, cell)
