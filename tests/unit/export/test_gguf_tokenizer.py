"""The llama.cpp tokenizer spec of an HF folder (ported as is: llama.cpp's converter will replace it)."""

from __future__ import annotations

import pytest

from finetune.export.gguf_params import GGUFExportError
from finetune.export.gguf_tokenizer import build_tokenizer_spec


def test_unrecognised_bpe_pre_tokenizer_is_an_error_not_a_guess(tiny_hf):
    class OtherBpe:  # a BPE tokenizer whose pre-tokenizer hash llama.cpp does not know
        def get_vocab(self):
            return {"a": 0}

        def get_added_vocab(self):
            return {}

        added_tokens_decoder: dict = {}

        def encode(self, text, add_special_tokens=True):
            return [0] * len(text)

    with pytest.raises(GGUFExportError, match="pre-tokenizer not recognised"):
        build_tokenizer_spec(tiny_hf, vocab_size=1, tokenizer=OtherBpe())
