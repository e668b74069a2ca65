"""finetune.models.choose: which packaged model and batch size fit the free memory."""

import pytest

from finetune.models.choose import GIB, MEMORY_TABLE, choose_for_memory
from finetune.models.packaged import SMOLLM2


@pytest.mark.parametrize(
    ("available", "spec", "batch"),
    [
        (16 * GIB, SMOLLM2, 4),
        (4 * GIB, SMOLLM2, 4),
        (4 * GIB - 1, SMOLLM2, 1),
        (2 * GIB, SMOLLM2, 1),
        (int(1.5 * GIB), SMOLLM2, 1),
        (int(1.5 * GIB) - 1, None, 0),
        (GIB, None, 0),
        (0, None, 0),
    ],
)
def test_choose_for_memory_table(available, spec, batch):
    choice = choose_for_memory(available)
    assert (choice.model_spec, choice.batch_size) == (spec, batch) and choice.reason


def test_reasons_name_the_numbers():
    assert choose_for_memory(8 * GIB).reason == f"8.0 GiB available >= 4.0 GiB: {SMOLLM2} batch 4"
    skip = choose_for_memory(GIB // 2)
    assert skip.reason == f"only 0.50 GiB available; {SMOLLM2} needs >= 1.5 GiB: skipping"
    unknown = choose_for_memory(None)
    assert unknown.model_spec is None and "unknown" in unknown.reason


def test_table_is_ordered_largest_first():
    needs = [need for need, _, _ in MEMORY_TABLE]
    assert needs == sorted(needs, reverse=True)
