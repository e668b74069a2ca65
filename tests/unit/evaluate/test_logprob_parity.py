"""Logprob parity measured through the evaluation with fake backends: what llama.cpp and MLX score, in which
thread, and the long context's length. No model."""

from __future__ import annotations

from finetune.evaluate.evaluation import Backends
from finetune.evaluate.prompts import TOKENIZER_TEXTS
from tests.unit.evaluate.test_evaluation import (  # noqa: F401 (fixtures)
    SETTINGS,
    Fakes,
    FakeTokenizer,
    data_dir,
    evaluate,
    prompts,
)


def test_mlx_scores_the_long_context_while_llamacpp_and_ollama_still_answer(data_dir, prompts):  # noqa: F811 (imported fixtures)
    import threading

    fakes = Fakes(prompts)
    scored = threading.Event()
    b = fakes.backends()

    def cpp_waits(*args):  # the worker continued the long context first, then answers only once MLX scored it
        assert scored.wait(10), "MLX waited for llama.cpp's answers before scoring the long context"
        return b.llamacpp_generate(*args)

    def mlx_scores(*args):
        assert hasattr(fakes, "long_prompt")
        out = b.mlx_logprobs(*args)
        scored.set()
        return out

    closed = []
    backends = Backends(b.load_tokenizer, b.mlx_generate, mlx_scores, cpp_waits, b.llamacpp_tokenize,
                        b.llamacpp_logprobs, b.llamacpp_continuation, lambda: closed.append(1))  # fmt: skip
    m = evaluate(data_dir, fakes, backends)
    assert m.runtimes["llamacpp"]["status"] == "passed" and m.logprob_error is None and closed == [1]
    assert list(m.runtimes) == ["mlx_base", "mlx_adapter", "mlx_fused", "llamacpp", "ollama"]


def test_tokenizer_texts_and_logprob_sequence(data_dir, prompts):  # noqa: F811 (imported fixtures)
    fakes = Fakes(prompts)
    m = evaluate(data_dir, fakes)
    assert m.tokenizer_texts == [*TOKENIZER_TEXTS, *(p.prompt for p in prompts[:4])]
    assert m.hf_ids == [FakeTokenizer().encode(t) for t in m.tokenizer_texts]
    # logprob_prompts=1: the first prompt followed by the fused model's answer, the same ids for both runtimes
    assert fakes.logprob_ids == FakeTokenizer().encode(prompts[0].prompt + m.answers["mlx_fused"][0].text)
    # the long context: 1024 tokens of the run's own rows and general text, its last 64 positions continued by
    # llama.cpp and scored by MLX from the same position on
    n = SETTINGS.long_positions
    assert len(fakes.long_prompt) == SETTINGS.long_context - n and fakes.long_ids[:-n] == fakes.long_prompt
    assert fakes.starts == [len(fakes.long_prompt) - 1, 0] and m.logprob_long == {
        "context": 1024,
        "positions": n,
    }
    assert len(m.logprob_candidate) == len(fakes.logprob_ids) + n == len(m.logprob_reference)


def test_the_long_context_is_cut_to_the_models_own(data_dir, prompts):  # noqa: F811 (imported fixtures)
    fakes = Fakes(prompts)
    m = evaluate(data_dir, fakes, model_context=512)
    assert len(fakes.long_ids) == 511 and m.logprob_long["context"] == 511  # llama.cpp needs one slot free
