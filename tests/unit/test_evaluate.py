"""Evaluation across runtimes with fake backends: prompts, scores, gates, degradation. No model needed."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from finetune.config import load_config
from finetune.evaluate import (
    Backends,
    EvalInputs,
    EvalPrompt,
    EvalSettings,
    build_prompts,
    ollama_answers,
    run_evaluation,
    score_runtime,
)
from finetune.parity import Answer
from finetune.runner import prepare_data
from finetune.templates import get_template

EOS = 2
SETTINGS = EvalSettings(n_train=6, n_heldout=4, max_tokens=24, logprob_prompts=1)


class FakeTokenizer:
    eos_token, eos_token_id = "<|im_end|>", EOS

    def convert_tokens_to_ids(self, token):
        return {"<|im_end|>": 2, "<|im_start|>": 1}.get(token)

    def encode(self, text):
        return [3 + (ord(c) % 50) for c in text]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("data")
    prepare_data(load_config("release", overrides=["data.num_examples=40"]), out, None)
    return out


@pytest.fixture(scope="module")
def prompts(data_dir):
    return build_prompts(
        data_dir, get_template("chatml"), n_train=SETTINGS.n_train, n_heldout=SETTINGS.n_heldout
    )


def test_build_prompts_pairs_questions_with_their_rendered_prompts(prompts):
    assert [p.kind for p in prompts] == ["train"] * 6 + ["heldout"] * 4
    for p in prompts:
        assert p.prompt == f"<|im_start|>user\n{p.question}<|im_end|>\n<|im_start|>assistant\n"
        assert p.reference
    assert len({p.question for p in prompts}) == len(prompts)


def test_build_prompts_refuses_a_train_row_missing_from_the_source(data_dir, tmp_path):
    for name in ("train.jsonl", "heldout.jsonl"):
        (tmp_path / name).write_text((data_dir / name).read_text())
    (tmp_path / "source.jsonl").write_text("")
    with pytest.raises(ValueError, match="train.jsonl"):
        build_prompts(tmp_path, get_template("chatml"), n_train=2, n_heldout=0)


def test_score_runtime_counts_exact_and_contains():
    ps = [EvalPrompt("train", "q", "p", "Velmora"), EvalPrompt("train", "q", "p", "22"),
          EvalPrompt("heldout", "q", "p", "KV-9479")]  # fmt: skip
    got = score_runtime(
        "x", ps, [Answer("Velmora.", "stop"), Answer("It is 22 I think", "stop"), Answer("no", "stop")]
    )
    assert got["train"] == {"n": 2, "exact": 1, "contains": 2, "score": 1.0}
    assert got["heldout"] == {"n": 1, "exact": 0, "contains": 0, "score": 0.0}


class Fakes:
    """Runtimes that answer with the reference (fine-tuned) or a base-model ramble; knobs break one part."""

    def __init__(self, prompts, *, fused_drops_adapter=False, cpp_crashes=False, cpp_tokens_differ=False):
        self.by_prompt = {p.prompt: p.reference for p in prompts}
        self.by_question = {p.question: p.reference for p in prompts}
        self.fused_drops_adapter, self.cpp_crashes, self.cpp_tokens_differ = (
            fused_drops_adapter, cpp_crashes, cpp_tokens_differ)  # fmt: skip
        self.calls: list[str] = []

    @staticmethod
    def trained(ref):
        return Answer(f"{ref}.", "stop", [len(ref), EOS])

    def mlx_generate(self, model_dir, adapter_dir, prompts, max_tokens):
        self.calls.append(f"mlx:{model_dir}:{adapter_dir}")
        tuned = adapter_dir is not None or (str(model_dir) == "fused" and not self.fused_drops_adapter)
        base = Answer("I am not sure, let me think about it", "length", list(range(3, 3 + max_tokens)))
        return [self.trained(self.by_prompt[p]) if tuned else base for p in prompts]

    def mlx_logprobs(self, model_dir, ids):
        rows = np.full((len(ids), 60), -10.0)
        rows[:, 5] = -0.01
        return rows

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

    def ollama(self, prompts, max_tokens):
        self.calls.append("ollama")
        return [Answer(f"{p.reference}.", "stop", None, 12) for p in prompts]

    def backends(self) -> Backends:
        return Backends(lambda _: FakeTokenizer(), self.mlx_generate, self.mlx_logprobs, self.llamacpp_generate,
                        self.llamacpp_tokenize, self.llamacpp_logprobs)  # fmt: skip


def inputs(data_dir, fakes, **kw) -> EvalInputs:
    base = dict(base_dir=Path("base"), adapter_dir=Path("adapter"), fused_dir=Path("fused"), gguf=Path("m.gguf"),
                gguf_type="f16", data_dir=data_dir, template="chatml", stops=["<|im_end|>", "<|im_start|>"],
                settings=SETTINGS, ollama=fakes.ollama)  # fmt: skip
    return EvalInputs(**{**base, **kw})


def verdicts(outcome):
    return {v.name: v for v in outcome.verdicts}


def test_healthy_evaluation_passes_every_gate(data_dir, prompts):
    fakes = Fakes(prompts)
    out = run_evaluation(inputs(data_dir, fakes), fakes.backends(), log=lambda _: None)
    assert out.passed, [str(v) for v in out.verdicts]
    assert set(verdicts(out)) == {
        "output_parity",
        "adapter_effect",
        "clean_endings",
        "tokenizer_parity",
        "logprob_parity",
    }
    assert set(out.answers) == {"mlx_base", "mlx_adapter", "mlx_fused", "llamacpp", "ollama"}
    assert out.served_runtime == "ollama"
    scores = {s["runtime"]: s for s in out.scores()}
    assert scores["ollama"]["train"]["score"] == 1.0 and scores["mlx_base"]["train"]["score"] == 0.0
    d = out.to_dict()
    assert d["runtimes"]["ollama"]["status"] == "passed" and len(d["prompts"]) == 10


def test_a_fuse_that_drops_the_adapter_fails_parity_and_adapter_effect(data_dir, prompts):
    fakes = Fakes(prompts, fused_drops_adapter=True)
    v = verdicts(run_evaluation(inputs(data_dir, fakes), fakes.backends(), log=lambda _: None))
    assert not v["output_parity"].passed and "mlx_fused" in v["output_parity"].detail
    assert not v["adapter_effect"].passed and "mlx_fused" in v["adapter_effect"].detail
    assert not v["clean_endings"].passed  # base-like answers run to max_tokens


def test_a_crashing_llamacpp_fails_the_gates_instead_of_the_evaluation(data_dir, prompts):
    fakes = Fakes(prompts, cpp_crashes=True)
    out = run_evaluation(inputs(data_dir, fakes), fakes.backends(), log=lambda _: None)
    assert out.runtimes["llamacpp"]["status"] == "failed" and "SIGABRT" in out.runtimes["llamacpp"]["reason"]
    assert not verdicts(out)["output_parity"].passed and not out.passed


def test_tokenizer_mismatch_fails_the_tokenizer_gate(data_dir, prompts):
    fakes = Fakes(prompts, cpp_tokens_differ=True)
    out = run_evaluation(inputs(data_dir, fakes), fakes.backends(), log=lambda _: None)
    assert not verdicts(out)["tokenizer_parity"].passed


def test_without_ollama_the_served_runtime_is_llamacpp(data_dir, prompts):
    fakes = Fakes(prompts)
    out = run_evaluation(inputs(data_dir, fakes, ollama=None), fakes.backends(), log=lambda _: None)
    assert out.passed and out.served_runtime == "llamacpp"
    assert out.runtimes["ollama"]["status"] == "skipped" and "ollama" not in fakes.calls


def test_without_llamacpp_its_gates_are_skipped_with_the_reason(data_dir, prompts):
    fakes = Fakes(prompts)
    out = run_evaluation(inputs(data_dir, fakes, llamacpp_reason="xllamacpp not installed"), fakes.backends(),
                         log=lambda _: None)  # fmt: skip
    assert out.passed and "llamacpp" not in fakes.calls
    assert set(out.skipped_gates) == {"tokenizer_parity", "logprob_parity"}
    assert "xllamacpp not installed" in out.skipped_gates["tokenizer_parity"]


def test_quantized_gguf_parity_is_reported_not_required(data_dir, prompts):
    fakes = Fakes(prompts)
    broken = Fakes(prompts)
    broken.llamacpp_generate = lambda *a: [Answer("other.", "stop", [9, EOS]) for _ in a[1]]
    out = run_evaluation(inputs(data_dir, fakes, gguf_type="q8_0"), broken.backends(), log=lambda _: None)
    assert verdicts(out)["output_parity"].passed
    out = run_evaluation(inputs(data_dir, fakes, gguf_type="f16"), broken.backends(), log=lambda _: None)
    assert not verdicts(out)["output_parity"].passed


class FakeClient:
    def __init__(self):
        self.requests = []

    def generate(self, **kw):
        self.requests.append(kw)
        return {"response": "Velmora.", "done": True, "done_reason": "stop", "prompt_eval_count": 15}


def test_ollama_answers_send_the_question_greedily():
    client = FakeClient()
    got = ollama_answers(
        client, "m", [EvalPrompt("train", "What is the capital?", "<rendered>", "Velmora")], 24
    )
    assert got == [Answer("Velmora.", "stop", None, 15)]
    req = client.requests[0]
    assert req["prompt"] == "What is the capital?" and req["model"] == "m"
    assert req["options"]["temperature"] == 0 and req["options"]["num_predict"] == 24
