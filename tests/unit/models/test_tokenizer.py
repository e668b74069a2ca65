"""finetune.models.tokenizer: a model folder's Hugging Face tokenizer, the one training tokenizes with."""

import pytest

from finetune.models.tokenizer import load_tokenizer


def test_loads_the_folders_tokenizer_with_its_chat_template(tiny):
    from tokenizers import Tokenizer

    tok = load_tokenizer(tiny.path)
    assert tok.eos_token == "<|im_end|>" and len(tok) == 49152
    text = "What is 12 + 7? 12 + 7 = 19."
    raw = Tokenizer.from_file(str(tiny.path / "tokenizer.json"))
    assert tok(text, add_special_tokens=False)["input_ids"] == raw.encode(text, add_special_tokens=False).ids
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    assert chat.endswith("<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")
    assert load_tokenizer(str(tiny.path)).vocab == tok.vocab  # str or Path


def test_a_folder_without_a_tokenizer_is_an_error(tmp_path):
    with pytest.raises((OSError, ValueError)):
        load_tokenizer(tmp_path)
