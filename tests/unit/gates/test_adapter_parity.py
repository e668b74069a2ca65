"""finetune.gates.adapter_parity: the export passes within k x the runtimes' own floor, and only if it moves."""

from finetune.evaluate.adapter_measure import AdapterMeasurement
from finetune.gates.adapter_parity import peft_parity


def test_an_export_within_k_times_the_floor_passes():
    v = peft_parity(AdapterMeasurement(floor=3e-5, gap=6e-5, effect=9.9, positions=20), 10)
    assert v.passed and v.measured == 2.0 and v.threshold == 10
    assert "max |d log p| 6e-05 over 20 positions; base vs base 3e-05 (allowed 10 x)" in v.detail


def test_a_weaker_export_fails_and_so_does_an_adapter_that_moves_nothing():
    weak = peft_parity(AdapterMeasurement(floor=3e-5, gap=5.1, effect=9.9, positions=20), 10)
    assert not weak.passed and "the export differs by 5.1, more than 10 x the floor" in weak.detail
    idle = peft_parity(AdapterMeasurement(floor=3e-5, gap=3e-5, effect=2e-4, positions=20), 10)
    assert not idle.passed and "nothing to compare" in idle.detail
