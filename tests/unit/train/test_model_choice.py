"""finetune.train.model_choice: which packaged model and batch size fit the free memory, from the estimator."""

import pytest

from finetune.models.gemma import GEMMA3
from finetune.models.packaged import SMOLLM2
from finetune.train.model_choice import BATCHES, GIB, PREFERENCE, SHAPES, choose_for_memory, need_bytes


def test_needs_grow_with_batch_and_model_size():
    for spec in PREFERENCE:
        needs = [need_bytes(SHAPES[spec], b) for b in BATCHES]
        assert needs == sorted(needs, reverse=True)
    # Gemma's 262k-token vocabulary makes its full fine-tune probe far larger than SmolLM2's
    assert need_bytes(SHAPES[GEMMA3], 1) > need_bytes(SHAPES[SMOLLM2], 4)


@pytest.mark.parametrize("model", [None, SMOLLM2, GEMMA3])
def test_the_largest_batch_that_fits_is_chosen(model):
    spec = model or PREFERENCE[0]
    for batch in BATCHES:
        need = need_bytes(SHAPES[spec], batch)
        assert choose_for_memory(need, model) == choose_for_memory(need, model)  # deterministic
        choice = choose_for_memory(need, model)
        assert (choice.model_spec, choice.batch_size) == (spec, batch)
        assert f"{need / GIB:.1f} GiB estimated for {spec} batch {batch}" in choice.reason
    below = choose_for_memory(need_bytes(SHAPES[spec], 1) - 1, model)
    assert (below.model_spec, below.batch_size) == (None, 0) and "skipping" in below.reason


def test_plenty_of_memory_keeps_the_preferred_model():
    choice = choose_for_memory(64 * GIB)
    assert (choice.model_spec, choice.batch_size) == (SMOLLM2, 4)


def test_unknown_memory_and_unknown_models():
    unknown = choose_for_memory(None)
    assert unknown.model_spec is None and "unknown" in unknown.reason
    other = choose_for_memory(64 * GIB, "org/some-model")
    assert (other.model_spec, other.batch_size) == ("org/some-model", 1) and "not known here" in other.reason


def test_a_model_that_is_not_packaged_is_sized_from_its_config():
    from finetune.models.tiny import TINY_CONFIG

    small = choose_for_memory(4 * GIB, "tiny-llama", TINY_CONFIG)
    assert (small.model_spec, small.batch_size) == ("tiny-llama", 4)
    assert "estimated for tiny-llama batch 4" in small.reason
    assert choose_for_memory(GIB // 4, "tiny-llama", TINY_CONFIG).model_spec is None


def test_two_local_ranks_where_the_cores_and_the_memory_allow():
    from finetune.train.model_choice import SHAPES, choose_ranks

    shape = SHAPES["smollm2-135m"]
    assert choose_ranks(None, 4, 16 * GIB, shape, 4)[0] == 2
    assert choose_ranks(None, 2, 16 * GIB, shape, 4) == (1, "1 rank (2 core(s), batch 4)")  # the probe's core
    assert choose_ranks(None, 8, 16 * GIB, shape, 1)[0] == 1  # one row per batch cannot be shared
    assert choose_ranks(None, 4, GIB, shape, 4)[1].startswith("1 rank: 1.0 GiB < ")
    assert choose_ranks("3", 2, GIB, shape, 4) == (3, "FT_RANKS=3")
    with pytest.raises(ValueError, match="FT_RANKS=5: needs 1 <= ranks <= the batch size"):
        choose_ranks("5", 2, GIB, shape, 4)
