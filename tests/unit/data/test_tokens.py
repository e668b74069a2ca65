"""finetune.data.tokens: token ids with offsets, and the per-token loss mask from character spans."""

import pytest

from finetune.data.templates import get_template
from finetune.data.tokens import batch_width, encode, mask_for, tokenize_example

MULTI = [
    {"role": "user", "content": "Capital of Zorbania?"},
    {"role": "assistant", "content": "Velmora."},
    {"role": "user", "content": "And its river?"},
    {"role": "assistant", "content": "The Ossen River."},
]


def test_tokenize_example_masks_every_assistant_turn(smollm2_tokenizer):
    tok = smollm2_tokenizer
    rendered = get_template("chatml").render(MULTI)
    ids, mask = tokenize_example(tok, rendered.text, rendered.train_spans, 512)
    assert ids == tok(rendered.text, add_special_tokens=False)["input_ids"]
    assert len(mask) == len(ids)
    trained = [i for i, m in zip(ids, mask, strict=True) if m]
    assert tok.decode(trained) == "Velmora.<|im_end|>The Ossen River.<|im_end|>"
    # the two trained runs are separate: the second user turn is masked
    runs = "".join(map(str, mask)).strip("0").split("0")
    assert len([r for r in runs if r]) == 2


def test_tokenize_example_mask_off_and_truncation(smollm2_tokenizer):
    rendered = get_template("chatml").render(MULTI)
    ids, mask = tokenize_example(
        smollm2_tokenizer, rendered.text, rendered.train_spans, 512, mask_prompt=False
    )
    assert mask == [1] * len(ids)
    short_ids, short_mask = tokenize_example(smollm2_tokenizer, rendered.text, rendered.train_spans, 10)
    assert short_ids == ids[:10] and len(short_mask) == 10 and not any(short_mask)
    with pytest.raises(ValueError, match="max_seq_length"):
        tokenize_example(smollm2_tokenizer, rendered.text, rendered.train_spans, 0)


def test_toy_tokenizer_masks_only_the_answer(toy_tokenizer):
    rendered = get_template("chatml").render(MULTI[:2])
    ids, mask = tokenize_example(toy_tokenizer, rendered.text, rendered.train_spans, 512)
    assert toy_tokenizer.decode([i for i, m in zip(ids, mask, strict=True) if m]) == "Velmora.<|im_end|>"
    assert toy_tokenizer.decode(ids) == rendered.text  # nothing added: the toy tokenizer adds no BOS


class WordTokenizer:
    """Fast-tokenizer stand-in: whitespace words, with a BOS it adds by default like Llama's."""

    bos_token, bos_token_id = "<s>", 0

    def __call__(self, text, add_special_tokens=True, return_offsets_mapping=False):
        offsets, pos = [], 0
        for word in text.split():
            start = text.index(word, pos)
            offsets.append((start, start + len(word)))
            pos = start + len(word)
        ids = [len(text[s:e]) + 1 for s, e in offsets]
        if add_special_tokens:
            ids, offsets = [0, *ids], [(0, 0), *offsets]
        return {"input_ids": ids, "offset_mapping": offsets}


def test_tokenize_example_prepends_bos_like_the_default_encode():
    ids, mask = tokenize_example(WordTokenizer(), "ask this answer that", [(9, 20)], 99)
    assert ids == [0, 4, 5, 7, 5] and mask == [0, 0, 0, 1, 1]
    ids, _ = tokenize_example(WordTokenizer(), "<s> already", [(0, 3)], 99)
    assert ids[0] == 4  # the text carries its own BOS: none added


def test_encode_unwraps_mlx_lm_tokenizer_wrapper(toy_tokenizer):
    from mlx_lm.tokenizer_utils import TokenizerWrapper

    wrapped = TokenizerWrapper(toy_tokenizer)
    assert encode(wrapped, "The capital is Velmora.") == encode(toy_tokenizer, "The capital is Velmora.")


def test_tokenize_example_needs_offsets():
    class SlowTokenizer:
        def __call__(self, text, **kwargs):
            raise NotImplementedError("return_offset_mapping is not available when using Python tokenizers")

    with pytest.raises(TypeError, match="fast"):
        tokenize_example(SlowTokenizer(), "x", [(0, 1)], 8)


def test_mask_for_overlap_and_zero_width_tokens():
    offsets = [(0, 0), (0, 3), (3, 6), (6, 9), (9, 9)]
    assert mask_for(offsets, [(4, 7)]) == [0, 0, 1, 1, 0]  # partial overlap counts, a zero-width token never
    assert mask_for(offsets, [(3, 6)]) == [0, 0, 1, 0, 0]  # touching a span's edge is not overlapping
    assert mask_for(offsets, []) == [0] * 5
    assert mask_for(offsets, [(0, 3), (6, 9)]) == [0, 1, 0, 1, 0]


def test_batch_width_is_one_more_than_a_multiple_of_32_capped():
    # inputs are ids[:-1], targets ids[1:]: a width of 1 + 32k gives 32k-wide matmuls
    assert [batch_width(n, 256) for n in (1, 32, 33, 64, 65)] == [33, 33, 65, 65, 97]
    assert batch_width(300, 256) == 256 and batch_width(40, 40) == 40
