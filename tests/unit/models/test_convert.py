"""finetune.models.convert: config and tokenizer fix-ups that make a converted GGUF load and tokenize right.

The full SmolLM2 conversion (convert_gguf, ~30 s) runs in test_packaged behind FT_SLOW_TESTS=1.
"""

import json

import pytest

from finetune.models.convert import (
    DIGIT_SPLIT,
    ConversionError,
    add_digit_split,
    fix_config_for_mlx,
    fix_tokenizer_config,
    write_json,
)
from finetune.models.resolve import rope_problem

BYTE_LEVEL = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}


def read(path):
    return json.loads(path.read_text(encoding="utf-8"))


def test_rope_theta_is_copied_to_the_top_level(tmp_path):
    f = tmp_path / "config.json"
    write_json(f, {"model_type": "llama", "rope_parameters": {"rope_type": "default", "rope_theta": 1e5}})
    assert rope_problem(read(f)) is not None
    fix_config_for_mlx(f)
    assert read(f)["rope_theta"] == 1e5 and rope_problem(read(f)) is None
    assert read(f)["rope_parameters"] == {"rope_type": "default", "rope_theta": 1e5}  # kept for transformers


def test_an_explicit_top_level_rope_theta_wins(tmp_path):
    f = tmp_path / "config.json"
    write_json(f, {"rope_theta": 5e5, "rope_parameters": {"rope_theta": 1e5}})
    fix_config_for_mlx(f)
    assert read(f)["rope_theta"] == 5e5
    write_json(f, {"model_type": "llama"})
    fix_config_for_mlx(f)
    assert read(f) == {"model_type": "llama"}


@pytest.mark.parametrize(
    ("pre", "expected"),
    [
        (BYTE_LEVEL, [DIGIT_SPLIT, BYTE_LEVEL]),
        ({"type": "Sequence", "pretokenizers": [BYTE_LEVEL]}, [DIGIT_SPLIT, BYTE_LEVEL]),
        (None, [DIGIT_SPLIT]),
    ],
)
def test_digit_split_is_put_first_once(tmp_path, pre, expected):
    f = tmp_path / "tokenizer.json"
    write_json(f, {"model": {"type": "BPE"}, "pre_tokenizer": pre})
    add_digit_split(f)
    assert read(f)["pre_tokenizer"] == {"type": "Sequence", "pretokenizers": expected}
    before = f.read_bytes()
    add_digit_split(f)
    assert f.read_bytes() == before  # idempotent
    assert read(f)["model"] == {"type": "BPE"}


def test_tokenizer_config_without_chatml_or_with_another_eos_is_refused(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ConversionError, match="no ChatML chat_template"):
        fix_tokenizer_config(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("<|im_start|>{{ m }}<|im_end|>")
    with pytest.raises(ConversionError, match="eos_token is '</s>', expected '<|im_end|>'"):
        fix_tokenizer_config(tmp_path)


def test_tokenizer_config_gets_the_template_and_loses_machine_noise(tmp_path):
    jinja = "{% for m in messages %}<|im_start|>{{ m['role'] }}{% endfor %}"
    (tmp_path / "chat_template.jinja").write_text(jinja)
    noisy = {
        "eos_token": "<|im_end|>",
        "is_local": True,
        "local_files_only": False,
        "bos_token": "<|im_start|>",
    }
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(noisy))
    fix_tokenizer_config(tmp_path)
    assert read(tmp_path / "tokenizer_config.json") == {
        "eos_token": "<|im_end|>",
        "bos_token": "<|im_start|>",
        "chat_template": jinja,
    }


def test_the_converted_tokenizer_splits_digits_like_llama_cpp(tiny):
    """tiny-llama's tokenizer files come from save_tokenizer (or a converted SmolLM2 with the same GGUF)."""
    from tokenizers import Tokenizer

    assert read(tiny.path / "tokenizer.json")["pre_tokenizer"]["pretokenizers"][0] == DIGIT_SPLIT
    tok = Tokenizer.from_file(str(tiny.path / "tokenizer.json"))
    assert tok.encode("12345", add_special_tokens=False).tokens == list("12345")
    config = read(tiny.path / "tokenizer_config.json")
    assert config["eos_token"] == "<|im_end|>" and "<|im_start|>" in config["chat_template"]
    assert "is_local" not in config
