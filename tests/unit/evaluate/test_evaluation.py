"""Evaluation across runtimes with fake backends: what is measured, and what the gates then judge. No model."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from finetune.config.schema import GatesConfig
from finetune.data.templates import get_template
from finetune.evaluate.evaluation import (
    Backends,
    EvalInputs,
    EvalSettings,
    run_evaluation,
    score_runtime,
    score_runtimes,
)
from finetune.evaluate.prompts import EvalPrompt, build_prompts
from finetune.gates.parity import Answer, ReferenceRows
from finetune.gates.runtime_parity import judge_runtimes

EOS = 2
SETTINGS = EvalSettings(n_train=6, n_heldout=4, max_tokens=24, logprob_prompts=1)
STOPS = ["<|im_end|>", "<|im_start|>"]


class FakeTokenizer:
    eos_token, eos_token_id, unk_token_id = "<|im_end|>", EOS, 0

    def convert_tokens_to_ids(self, token):
        return {"<|im_end|>": 2, "<|im_start|>": 1}.get(token, 0)

    def encode(self, text, add_special_tokens=True):
        return [3 + (ord(c) % 50) for c in text]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    from finetune.config.loader import load_config
    from finetune.data.prepare import prepare_for_run

    out = tmp_path_factory.mktemp("data")
    prepare_for_run(
        load_config("release", overrides=["data.num_examples=40", "data.template=chatml"]).data, out, None
    )
    return out


@pytest.fixture(scope="module")
def prompts(data_dir):
    return build_prompts(
        data_dir, get_template("chatml"), n_train=SETTINGS.n_train, n_heldout=SETTINGS.n_heldout
    )


def test_score_runtime_counts_exact_and_contains():
    ps = [EvalPrompt("train", "q", "p", "Velmora"), EvalPrompt("train", "q", "p", "22"),
          EvalPrompt("heldout", "q", "p", "KV-9479")]  # fmt: skip
    got = score_runtime(
        "x", ps, [Answer("Velmora.", "stop"), Answer("It is 22 I think", "stop"), Answer("no", "stop")]
    )
    assert got["runtime"] == "x"
    assert got["train"] == {"n": 2, "exact": 1, "contains": 2, "score": 1.0}
    assert got["heldout"] == {"n": 1, "exact": 0, "contains": 0, "score": 0.0}
    assert [
        s["runtime"]
        for s in score_runtimes(ps, {"a": [Answer("no", "stop")] * 3, "b": [Answer("no", "stop")] * 3})
    ] == ["a", "b"]


class Fakes:
    """Runtimes that answer with the reference (fine-tuned) or a base-model ramble; knobs break one part."""

    def __init__(self, prompts, *, fused_drops_adapter=False, cpp_crashes=False, cpp_tokens_differ=False):
        self.by_prompt = {p.prompt: p.reference for p in prompts}
        self.fused_drops_adapter, self.cpp_crashes, self.cpp_tokens_differ = (
            fused_drops_adapter, cpp_crashes, cpp_tokens_differ)  # fmt: skip
        self.calls: list[str] = []
        self.logprob_ids: list[int] = []
        self.long_ids: list[int] = []
        self.starts: list[int] = []

    @staticmethod
    def trained(ref):
        return Answer(f"{ref}.", "stop", [len(ref), EOS])

    def mlx_generate(self, model_dir, adapter_dir, prompts, max_tokens):
        self.calls.append(f"mlx:{model_dir}:{adapter_dir}")
        tuned = adapter_dir is not None or (str(model_dir) == "fused" and not self.fused_drops_adapter)
        base = Answer("I am not sure, let me think about it", "length", list(range(3, 3 + max_tokens)))
        return [self.trained(self.by_prompt[p]) if tuned else base for p in prompts]

    def mlx_logprobs(self, model_dir, adapter_dir, requests, k):
        self.calls.append(f"logprobs:{model_dir}:{adapter_dir}")
        for ids, _, start in requests:  # the long context is scored from its last prompt position on
            self.long_ids = list(ids) if start else self.long_ids
            self.logprob_ids = self.logprob_ids if start else list(ids)
            self.starts.append(start)
        rows = [np.full((len(at), 60), -10.0) for _, at, _ in requests]
        for r in rows:
            r[:, 5] = -0.01
        return [
            ReferenceRows.from_full(r, [dict.fromkeys(a, 0.0) for a in at], k)
            for r, (_, at, _) in zip(rows, requests, strict=True)
        ]

    def llamacpp_generate(self, gguf, prompts, max_tokens, stops):
        self.calls.append("llamacpp")
        if self.cpp_crashes:
            raise RuntimeError("llama.cpp child exited with code -6 (SIGABRT)")
        return [self.trained(self.by_prompt[p]) for p in prompts]

    def llamacpp_tokenize(self, gguf, texts):
        ids = [FakeTokenizer().encode(t) for t in texts]
        return [i[:-1] for i in ids] if self.cpp_tokens_differ else ids

    def llamacpp_logprobs(self, gguf, ids, k):
        return [{5: -0.02, 7: -10.0} for _ in ids]

    def llamacpp_continuation(self, gguf, prompt, n, k):
        self.long_prompt = list(prompt)
        return [(5, {5: -0.02, 7: -10.0})] * n

    def ollama(self, prompts):  # Ollama renders each conversation as training did
        self.calls.append("ollama")
        return [Answer(f"{p.reference}.", "stop", None, 12, p.prompt) for p in prompts]

    def backends(self) -> Backends:
        return Backends(lambda _: FakeTokenizer(), self.mlx_generate, self.mlx_logprobs, self.llamacpp_generate,
                        self.llamacpp_tokenize, self.llamacpp_logprobs, self.llamacpp_continuation)  # fmt: skip


def inputs(data_dir, fakes, **kw) -> EvalInputs:
    base = dict(base_dir=Path("base"), adapter_dir=Path("adapter"), fused_dir=Path("fused"), gguf=Path("m.gguf"),
                gguf_type="f16", data_dir=data_dir, template="chatml", stops=STOPS, max_tokens=24,
                settings=SETTINGS, ollama=fakes.ollama)  # fmt: skip
    return EvalInputs(**{**base, **kw})


def evaluate(data_dir, fakes, backends=None, **kw):
    return run_evaluation(inputs(data_dir, fakes, **kw), backends or fakes.backends(), log=lambda _: None)


def verdicts(m):
    return {v.name: v for v in judge_runtimes(m, GatesConfig())}


def test_healthy_evaluation_measures_every_runtime_and_passes_every_gate(data_dir, prompts):
    fakes = Fakes(prompts)
    m = evaluate(data_dir, fakes)
    v = verdicts(m)
    assert set(v) == {"output_parity", "adapter_effect", "clean_endings", "gguf_tokenizer", "logprob_parity"}
    assert all(x.passed for x in v.values()), [str(x) for x in v.values()]
    assert set(m.answers) == {"mlx_base", "mlx_adapter", "mlx_fused", "llamacpp", "ollama"}
    assert all(r["status"] == "passed" and r["seconds"] >= 0 for r in m.runtimes.values())
    assert m.prompts == prompts and m.gguf_type == "f16" and m.end_ids == [1, 2]
    scores = {s["runtime"]: s for s in score_runtimes(m.prompts, m.answers)}
    assert scores["ollama"]["train"]["score"] == 1.0 and scores["mlx_base"]["train"]["score"] == 0.0
    # the prompts Ollama rendered, read by the GGUF's tokenizer, next to the training render's ids
    assert m.served_prompt_ids == m.training_prompt_ids and len(m.served_prompt_ids) == len(prompts)
    assert m.served_ids_tokenizer == "the GGUF's, in llama.cpp"


def test_the_answers_use_the_given_budget_and_ollama_prompts_without_a_render_stay_none(data_dir, prompts):
    fakes = Fakes(prompts)
    seen = []
    b = fakes.backends()

    def mlx(model_dir, adapter_dir, texts, max_tokens):
        seen.append(max_tokens)
        return b.mlx_generate(model_dir, adapter_dir, texts, max_tokens)

    def unrendered(ps):
        return [
            Answer(f"{p.reference}.", "stop", None, 12, None if i == 0 else p.prompt)
            for i, p in enumerate(ps)
        ]

    backends = Backends(b.load_tokenizer, mlx, b.mlx_logprobs, b.llamacpp_generate, b.llamacpp_tokenize,
                        b.llamacpp_logprobs, b.llamacpp_continuation)  # fmt: skip
    m = evaluate(data_dir, fakes, backends, max_tokens=57, ollama=unrendered, llamacpp_reason="not here")
    assert seen == [57, 57, 57]
    assert m.served_prompt_ids[0] is None and m.served_prompt_ids[1:] == m.training_prompt_ids[1:]
    assert m.served_ids_tokenizer.startswith("HF's (llama.cpp: RuntimeError: not here")


def test_the_runtimes_get_the_right_folders(data_dir, prompts):
    fakes = Fakes(prompts)
    m = evaluate(data_dir, fakes)
    # MLX in the caller's thread, llama.cpp then Ollama beside it (child processes on the idle core); base +
    # adapter last, so the real backend scores the logprob reference with the model it has loaded
    assert [c for c in fakes.calls if c.startswith("mlx:")] == [
        "mlx:base:None",
        "mlx:fused:None",
        "mlx:base:adapter",
    ]
    assert [c for c in fakes.calls if c in ("llamacpp", "ollama")] == ["llamacpp", "ollama"]
    # the long context, then the short answers: base + adapter, not the fused folder
    assert fakes.calls[-2:] == ["logprobs:base:adapter"] * 2 and len(fakes.calls) == 7
    assert (
        list(m.answers) == list(m.runtimes) == ["mlx_base", "mlx_adapter", "mlx_fused", "llamacpp", "ollama"]
    )


def test_llamacpp_and_ollama_run_beside_mlx(data_dir, prompts):
    import threading

    fakes = Fakes(prompts)
    both = threading.Barrier(2, timeout=10)  # passes only if an MLX call and llama.cpp are in flight together
    mlx, cpp = fakes.mlx_generate, fakes.llamacpp_generate

    def mlx_waits(model_dir, adapter_dir, prompts, max_tokens):
        if adapter_dir is None and str(model_dir) == "base":
            both.wait()
        return mlx(model_dir, adapter_dir, prompts, max_tokens)

    def cpp_waits(*args):
        both.wait()
        return cpp(*args)

    backends = fakes.backends()
    backends.mlx_generate, backends.llamacpp_generate = mlx_waits, cpp_waits
    m = evaluate(data_dir, fakes, backends)
    assert all(r["status"] == "passed" for r in m.runtimes.values()), m.runtimes


def test_a_fuse_that_drops_the_adapter_fails_parity_and_adapter_effect(data_dir, prompts):
    v = verdicts(evaluate(data_dir, Fakes(prompts, fused_drops_adapter=True)))
    assert not v["output_parity"].passed and "mlx_fused" in v["output_parity"].detail
    assert not v["adapter_effect"].passed and "mlx_fused" in v["adapter_effect"].detail
    assert v["clean_endings"].passed  # base answers part from the reference early: output_parity counts them


def test_the_eval_runtime_base_fault_fails_output_parity(data_dir, prompts, plant_fault):
    fakes = Fakes(prompts)
    plant_fault("eval_runtime_base")
    m = evaluate(data_dir, fakes)
    assert fakes.calls[2] == "mlx:base:None"  # the "fused" runtime was given the base folder
    v = verdicts(m)
    assert not v["output_parity"].passed and "mlx_fused" in v["output_parity"].detail


def test_a_crashing_llamacpp_fails_the_gates_instead_of_the_evaluation(data_dir, prompts):
    m = evaluate(data_dir, Fakes(prompts, cpp_crashes=True))
    assert m.runtimes["llamacpp"]["status"] == "failed" and "SIGABRT" in m.runtimes["llamacpp"]["reason"]
    assert "llamacpp" not in m.answers and "ollama" in m.answers  # the other runtimes still ran
    assert not verdicts(m)["output_parity"].passed


def test_tokenizer_mismatch_fails_the_tokenizer_gate(data_dir, prompts):
    v = verdicts(evaluate(data_dir, Fakes(prompts, cpp_tokens_differ=True)))
    assert not v["gguf_tokenizer"].passed and v["output_parity"].passed


def test_a_tokenize_or_logprob_crash_is_recorded_not_raised(data_dir, prompts):
    fakes = Fakes(prompts)

    def crash(*_):
        raise RuntimeError("llama.cpp aborted")

    b = fakes.backends()
    m = evaluate(data_dir, fakes, Backends(b.load_tokenizer, b.mlx_generate, b.mlx_logprobs, b.llamacpp_generate,
                                           crash, crash, b.llamacpp_continuation))  # fmt: skip
    assert m.gguf_ids is None and m.gguf_ids_error == "RuntimeError: llama.cpp aborted"
    assert m.logprob_error == "RuntimeError: llama.cpp aborted"
    v = verdicts(m)
    assert not v["gguf_tokenizer"].passed and not v["logprob_parity"].passed


def test_without_ollama_it_is_skipped_with_the_reason(data_dir, prompts):
    fakes = Fakes(prompts)
    m = evaluate(data_dir, fakes, ollama=None, ollama_reason="no Ollama binary: not on PATH")
    assert m.runtimes["ollama"] == {"status": "skipped", "reason": "no Ollama binary: not on PATH"}
    assert "ollama" not in fakes.calls and "ollama" not in m.answers
    assert all(x.passed for x in verdicts(m).values())


def test_without_llamacpp_its_gates_are_skipped_with_the_reason(data_dir, prompts):
    fakes = Fakes(prompts)
    m = evaluate(data_dir, fakes, llamacpp_reason="xllamacpp not installed")
    assert "llamacpp" not in fakes.calls and m.gguf_ids is None and m.logprob_reference is None
    v = verdicts(m)
    assert {k for k, x in v.items() if x.status == "skipped"} == {"gguf_tokenizer", "logprob_parity"}
    assert "xllamacpp not installed" in v["gguf_tokenizer"].detail
    assert all(x.passed for k, x in v.items() if x.status != "skipped")


def test_quantized_gguf_parity_is_judged_more_loosely(data_dir, prompts):
    fakes = Fakes(prompts)
    half = {p.prompt for p in prompts[::2]}

    def drifting(gguf, texts, max_tokens, stops):  # a quantized GGUF that flips some answers
        return [
            Answer("other.", "stop", [9, EOS]) if t in half else Fakes.trained(fakes.by_prompt[t])
            for t in texts
        ]

    b = fakes.backends()
    broken = Backends(b.load_tokenizer, b.mlx_generate, b.mlx_logprobs, drifting, b.llamacpp_tokenize,
                      b.llamacpp_logprobs, b.llamacpp_continuation)  # fmt: skip
    assert verdicts(evaluate(data_dir, fakes, broken, gguf_type="q8_0"))["output_parity"].passed
    assert not verdicts(evaluate(data_dir, fakes, broken, gguf_type="f16"))["output_parity"].passed


def test_settings_serialize():
    assert EvalSettings().to_dict() == {"n_train": 12, "n_heldout": 12, "max_tokens": None, "logprob_prompts": 2,
                                        "short_depth": 160, "top_k": 20, "ref_top_k": 5, "long_context": 1024,
                                        "long_positions": 64}  # fmt: skip


def test_the_base_runtime_decodes_once_for_the_same_base_and_prompts(data_dir, prompts, tmp_path):
    fakes = Fakes(prompts)
    base = tmp_path / "base"
    base.mkdir()
    (base / "model.safetensors").write_bytes(b"weights")
    first = evaluate(data_dir, fakes, base_dir=base, base_answers_dir=tmp_path / "kept")
    again = evaluate(data_dir, fakes, base_dir=base, base_answers_dir=tmp_path / "kept")
    assert fakes.calls.count(f"mlx:{base}:None") == 1  # the second evaluation read what the first decoded
    assert again.answers["mlx_base"] == first.answers["mlx_base"]
    assert again.runtimes["mlx_base"]["status"] == "passed"
