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


def test_a_floor_as_large_as_the_adapter_names_a_wrong_base():
    v = peft_parity(AdapterMeasurement(floor=50.9, gap=24.1, effect=57.2, positions=52), 10)
    assert not v.passed and "a floor that large is a base other than the trained one" in v.detail


def served(agree=8, changes=8, served_changes=8, prompts=8):
    from finetune.evaluate.served_adapter import ServedAdapterMeasurement

    return ServedAdapterMeasurement(prompts, agree, changes, served_changes)


def test_the_served_adapter_passes_when_ollama_answers_as_mlx_does():
    from finetune.gates.adapter_parity import served_adapter

    v = served_adapter(served(), 0.9)
    assert v.passed and v.measured == 1.0 and "8/8 training answers equal" in v.detail


def test_the_served_adapter_fails_on_other_answers_an_ignored_adapter_or_one_that_moves_nothing():
    from finetune.gates.adapter_parity import served_adapter

    assert "below 0.9" in served_adapter(served(agree=4), 0.9).detail
    ignored = served_adapter(served(agree=8, served_changes=0), 0.9)
    assert not ignored.passed and "ADAPTER not applied" in ignored.detail
    idle = served_adapter(served(changes=0, served_changes=0), 0.9)
    assert not idle.passed and "changes no answer in MLX" in idle.detail


def test_adapters_side_by_side_pass_when_each_answers_its_own_and_not_the_others():
    from finetune.gates.adapter_parity import adapters_separate

    ok = adapters_separate({"geo": 1.0, "math": 0.875}, {"geo": {"math": 0.0}, "math": {"geo": 0.125}}, 0.8)
    assert ok.passed and ok.measured == 0.125 and "own answers geo 100%, math 88%" in ok.detail
    swapped = adapters_separate({"geo": 0.0, "math": 0.0}, {"geo": {"math": 1.0}, "math": {"geo": 1.0}}, 0.9)
    assert not swapped.passed and "geo gives math's answers to 100% of math's questions" in swapped.detail
    assert "geo answers 0% of its own questions" in swapped.detail
