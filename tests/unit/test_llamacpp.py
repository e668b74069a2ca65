"""llama.cpp checks: the parity gates (pure), the child-process guard, and real runs on a tiny GGUF."""

from __future__ import annotations

import dataclasses
import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from finetune import llamacpp as L
from finetune.gguf_export import export_gguf, load_hf_tensors, permute_qk
from finetune.gguf_tokenizer import build_tokenizer_spec

needs_xllamacpp = pytest.mark.skipif(
    importlib.util.find_spec("xllamacpp") is None, reason="xllamacpp (llama.cpp) is not installed"
)


# --------------------------------------------------------------------------- gates on synthetic data


def test_tokenizer_parity_passes_on_identical_ids():
    r = L.tokenizer_parity(["a", "b"], [[1, 2], [3]], [[1, 2], [3]])
    assert r.ok and r.metrics["match_rate"] == 1.0


def test_tokenizer_parity_fails_and_points_at_the_first_difference():
    r = L.tokenizer_parity(["a b", "c"], [[1, 2, 3], [4]], [[1, 9, 3], [4]])
    assert not r.ok and r.metrics["match_rate"] == 0.5
    assert "at token 1" in r.problems[0] and "[2, 3]" in r.problems[0]


def test_tokenizer_parity_fails_when_llamacpp_crashed():
    r = L.tokenizer_parity(["a"], [[1]], L.LlamaCppError("child exited with code -6 (SIGABRT)"))
    assert not r.ok and "SIGABRT" in r.problems[0]


def _logsoftmax(x):
    x = np.asarray(x, dtype=np.float64)
    return x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(-1, keepdims=True)


def _top(row, k=3):
    ids = np.argsort(-row)[:k]
    return {int(i): float(row[i]) for i in ids}


def test_logprob_parity_passes_within_tolerance():
    ref = _logsoftmax(np.random.default_rng(0).normal(size=(5, 50)) * 3)
    cand = [{t: lp + 1e-4 for t, lp in _top(row).items()} for row in ref]
    r = L.logprob_parity(ref, cand, max_abs=1e-3)
    assert r.ok and r.metrics["top1_agreement"] == 1.0 and r.metrics["max_abs_diff"] == pytest.approx(1e-4)


def test_logprob_parity_fails_on_a_large_difference_and_on_a_wrong_top1():
    ref = _logsoftmax(np.random.default_rng(1).normal(size=(4, 50)) * 3)
    cand = [_top(row) for row in ref]
    second = sorted(cand[2], key=cand[2].get)[-2]
    cand[2] = {second: 0.0}  # llama.cpp claims another token is certain
    r = L.logprob_parity(ref, cand, max_abs=1e-2)
    assert not r.ok and r.metrics["top1_agreement"] == 0.75
    assert any("max |logprob diff|" in p and "position 2" in p for p in r.problems)
    assert any("top-1 agreement 75.0%" in p for p in r.problems)


def test_logprob_parity_treats_a_near_tie_within_tolerance_as_agreement():
    ref = np.log(np.array([[0.5 + 1e-5, 0.5 - 1e-5]]))
    r = L.logprob_parity(ref, [{1: float(ref[0, 1]), 0: float(ref[0, 1])}], max_abs=1e-3)
    assert r.ok and r.metrics["top1_agreement_tol"] == 1.0


def test_logprob_parity_tie_margin_is_separate_from_max_abs():
    ref = np.log(
        np.array([[0.52, 0.48]])
    )  # a 0.08 gap: a tie for a loose margin, a real choice for a tight one
    cand = [{1: float(ref[0, 0]), 0: float(ref[0, 1])}]  # llama.cpp swapped the two
    assert not L.logprob_parity(ref, cand, max_abs=1.0, tie_margin=0.01).ok
    assert L.logprob_parity(ref, cand, max_abs=1.0, tie_margin=0.1).ok


def test_greedy_parity():
    assert L.greedy_parity([[1, 2, 3]], [[1, 2, 3]]).ok
    r = L.greedy_parity([[1, 2, 3], [5]], [[1, 2, 4], [5]])
    assert not r.ok and "diverge at step 2" in r.problems[0] and r.metrics["greedy_match_rate"] == 0.5


# --------------------------------------------------------------------------- the child-process guard


def _runner_writing(response):
    def runner(cmd, **kwargs):
        Path(cmd[-1]).write_text(json.dumps(response))
        return subprocess.CompletedProcess(cmd, 0, "", "")

    return runner


def test_run_child_returns_the_childs_result_and_raises_its_error():
    assert L.run_child({"op": "tokenize"}, runner=_runner_writing({"result": [[1]]})) == [[1]]
    with pytest.raises(L.LlamaCppError, match="Failed to init server"):
        L.run_child(
            {"op": "tokenize"}, runner=_runner_writing({"error": "RuntimeError: Failed to init server"})
        )


def test_run_child_reports_a_real_abort_with_exit_code_and_stderr():
    def aborting(cmd, **kwargs):  # a real child that dies like llama.cpp on std::out_of_range
        code = "import os,sys; sys.stderr.write('terminate called: std::out_of_range\\n'); sys.stderr.flush(); os.abort()"
        return subprocess.run([sys.executable, "-c", code], **kwargs)

    with pytest.raises(L.LlamaCppError, match=r"code -6 \(SIGABRT\)[\s\S]*std::out_of_range"):
        L.run_child({"op": "tokenize", "gguf": "x.gguf"}, runner=aborting)


def test_run_child_times_out_instead_of_hanging():
    def hanging(cmd, **kwargs):
        return subprocess.run([sys.executable, "-c", "import time; time.sleep(30)"], **kwargs)

    with pytest.raises(L.LlamaCppError, match="timed out after 1 s"):
        L.run_child({"op": "generate"}, timeout=1, runner=hanging)


# --------------------------------------------------------------------------- real llama.cpp on a tiny model


@pytest.fixture(scope="module")
def hf_tokenizer(tiny_hf):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny_hf))


@pytest.fixture(scope="module")
def mlx_ref(tiny_hf):
    return L.MlxReference(tiny_hf)


@pytest.fixture(scope="module")
def cpp_tokens(tiny_f16_gguf):
    return L.tokenize(tiny_f16_gguf, L.SAMPLE_TEXTS)


@needs_xllamacpp
def test_tokenizer_parity_with_hf_on_a_correct_export(cpp_tokens, hf_tokenizer):
    ref = [hf_tokenizer.encode(t) for t in L.SAMPLE_TEXTS]
    r = L.tokenizer_parity(L.SAMPLE_TEXTS, ref, cpp_tokens)
    assert r.ok, r.problems
    assert 1 in ref[4]  # the chat markup really was parsed as the <|im_start|> special token


@needs_xllamacpp
def test_tokenizer_parity_catches_an_hf_tokenizer_without_smollm2s_digit_split(tiny_hf, cpp_tokens, tmp_path):
    from transformers import AutoTokenizer

    # What transformers' GGUF loader produces: plain ByteLevel, so " ½" merges unlike llama.cpp's "smollm".
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (tmp_path / name).write_bytes((tiny_hf / name).read_bytes())
    tj = json.loads((tmp_path / "tokenizer.json").read_text(encoding="utf-8"))
    tj["pre_tokenizer"] = tj["pre_tokenizer"]["pretokenizers"][1]
    (tmp_path / "tokenizer.json").write_text(json.dumps(tj), encoding="utf-8")
    plain = AutoTokenizer.from_pretrained(str(tmp_path))
    r = L.tokenizer_parity(L.SAMPLE_TEXTS, [plain.encode(t) for t in L.SAMPLE_TEXTS], cpp_tokens)
    assert not r.ok and any("Fractions" in p for p in r.problems)


@needs_xllamacpp
def test_tokenizer_parity_fails_on_a_vocab_labelled_sentencepiece_without_merges(
    tiny_hf, tiny_spec, hf_tokenizer, tmp_path
):
    broken = dataclasses.replace(
        tiny_spec, model="llama", pre="default", merges=[], scores=[-1000.0] * len(tiny_spec.tokens)
    )
    gguf = export_gguf(tiny_hf, tmp_path / "mlx-lm-style.gguf", tokenizer_spec=broken)
    try:
        got = L.tokenize(gguf, L.SAMPLE_TEXTS)
    except L.LlamaCppError as exc:  # llama.cpp throws std::out_of_range (or aborts): the gate must not hang
        got = exc
    r = L.tokenizer_parity(L.SAMPLE_TEXTS, [hf_tokenizer.encode(t) for t in L.SAMPLE_TEXTS], got)
    assert not r.ok


@needs_xllamacpp
def test_llamacpp_refuses_mlx_lms_own_export(tiny_hf, tmp_path):
    import mlx.core as mx
    from mlx_lm.gguf import convert_to_gguf

    out = tmp_path / "mlx-lm.gguf"
    config = json.loads((tiny_hf / "config.json").read_text())
    convert_to_gguf(tiny_hf, mx.load(str(tiny_hf / "model.safetensors")), config, str(out))
    with pytest.raises(L.LlamaCppError, match="invalid gguf type for tokenizer.ggml.token_type"):
        L.tokenize(out, ["hello"])


@needs_xllamacpp
@pytest.mark.parametrize(("outtype", "precise"), [("f16", False), ("f32", True)])
def test_logprob_parity_with_mlx(
    tiny_hf, tiny_spec, tiny_f16_gguf, mlx_ref, hf_tokenizer, tmp_path, outtype, precise
):
    gguf = (
        tiny_f16_gguf
        if outtype == "f16"
        else export_gguf(tiny_hf, tmp_path / "f32.gguf", outtype="f32", tokenizer_spec=tiny_spec)
    )
    ids = hf_tokenizer.encode(L.SAMPLE_TEXTS[4])
    tol = L.LOGPROB_TOLERANCE[f"{outtype}_precise" if precise else outtype]
    r = L.logprob_parity(mlx_ref.logprobs(ids), L.top_logprobs(gguf, ids, k=5, precise=precise), **tol)
    assert r.ok, (r.problems, r.metrics)
    assert r.metrics["top1_agreement"] == 1.0


@needs_xllamacpp
def test_logprob_parity_fails_when_qk_are_laid_out_wrong(tiny_hf, tiny_spec, mlx_ref, hf_tokenizer, tmp_path):
    from safetensors.numpy import save_file

    # Permuting Q/K once more in the HF folder leaves the GGUF in the wrong RoPE layout.
    bad = tmp_path / "hf"
    bad.mkdir()
    tensors = load_hf_tensors(tiny_hf)
    for name in tensors:
        if "q_proj" in name or "k_proj" in name:
            tensors[name] = permute_qk(tensors[name], 4, 4 if "q_proj" in name else 2)
    save_file(tensors, str(bad / "model.safetensors"))
    (bad / "config.json").write_text((tiny_hf / "config.json").read_text())
    gguf = export_gguf(bad, tmp_path / "bad.gguf", tokenizer_spec=tiny_spec)
    ids = hf_tokenizer.encode(L.SAMPLE_TEXTS[4])
    r = L.logprob_parity(mlx_ref.logprobs(ids), L.top_logprobs(gguf, ids, k=5), **L.LOGPROB_TOLERANCE["f16"])
    assert not r.ok and r.metrics["max_abs_diff"] > 0.5


@needs_xllamacpp
def test_greedy_generation_matches_mlx(tiny_f16_gguf, mlx_ref, hf_tokenizer):
    prompts = [hf_tokenizer.encode(t) for t in (L.SAMPLE_TEXTS[0], L.SAMPLE_TEXTS[4])]
    gens = L.generate(tiny_f16_gguf, prompts, max_tokens=6)
    assert [g.finish_reason for g in gens] == ["length", "length"] and all(len(g.tokens) == 6 for g in gens)
    assert gens[0].text == hf_tokenizer.decode(gens[0].tokens)
    r = L.greedy_parity([mlx_ref.greedy(p, 6) for p in prompts], [g.tokens for g in gens])
    assert r.ok, r.problems


@pytest.fixture(scope="module")
def spm_hf(tmp_path_factory) -> Path:
    """A 1-layer Llama whose tokenizer is SentencePiece BPE with byte fallback, trained here in ~0.1 s."""
    import io

    import sentencepiece as spm
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    out = tmp_path_factory.mktemp("spm")
    corpus = [*L.SAMPLE_TEXTS, "The quick brown fox. Hello world 123.", "def f(x): return x * 2"] * 20
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_writer=model,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        character_coverage=1.0,
        minloglevel=2,
        unk_id=0,
        bos_id=1,
        eos_id=2,
        pad_id=-1,
        normalization_rule_name="identity",  # as Llama's SentencePiece models
        remove_extra_whitespaces=False,
    )
    (out / "tokenizer.model").write_bytes(model.getvalue())
    tok_cfg = {
        "tokenizer_class": "LlamaTokenizer",
        "bos_token": "<s>",
        "eos_token": "</s>",
        "unk_token": "<unk>",
        "add_bos_token": True,
        "legacy": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(tok_cfg))
    cfg = LlamaConfig(
        vocab_size=400,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=256,
        tie_word_embeddings=False,
        initializer_range=0.1,
    )
    torch.manual_seed(1)
    LlamaForCausalLM(cfg).save_pretrained(out)
    return out


@needs_xllamacpp
def test_sentencepiece_llama_export_matches_hf_and_mlx(spm_hf, tmp_path):
    from transformers import AutoTokenizer

    from finetune.gguf_inspect import check_gguf, inspect_gguf

    spec = build_tokenizer_spec(spm_hf)
    assert (spec.model, spec.add_bos) == ("llama", True)
    gguf = export_gguf(spm_hf, tmp_path / "spm.gguf", outtype="f32", tokenizer_spec=spec)
    info = inspect_gguf(gguf)
    assert (
        info.scores and info.token_types[3] == 6 and "output.weight" in {t.name for t in info.tensors}
    )  # BYTE
    assert check_gguf(gguf, spm_hf, spec=spec) == []
    tok = AutoTokenizer.from_pretrained(str(spm_hf))
    # transformers 5 converts tokenizer.model to a Metaspace(prepend_scheme="first") tokenizer.json that adds no
    # "▁" before leading spaces, unlike sentencepiece itself and llama.cpp: leave that text out here.
    texts = [t for t in L.SAMPLE_TEXTS if not t.startswith(" ")]
    ref = [tok.encode(t) for t in texts]
    r = L.tokenizer_parity(texts, ref, L.tokenize(gguf, texts))
    assert r.ok, r.problems
    lp = L.logprob_parity(
        L.MlxReference(spm_hf).logprobs(ref[0]),
        L.top_logprobs(gguf, ref[0], k=5, precise=True),
        **L.LOGPROB_TOLERANCE["f32_precise"],
    )
    assert lp.ok, (lp.problems, lp.metrics)


# --------------------------------------------------------------------------- tier 2: the real SmolLM2-135M


@needs_xllamacpp
@pytest.mark.real_model
@pytest.mark.skipif(
    __import__("os").environ.get("FT_REAL_MODEL_ENABLE") != "1",
    reason="tier 2: set FT_REAL_MODEL_ENABLE=1 to export SmolLM2-135M and check it against MLX (~1-2 min)",
)
def test_smollm2_export_matches_mlx_in_llamacpp(tmp_path):
    from transformers import AutoTokenizer

    from finetune.gguf_inspect import check_gguf
    from finetune.models import resolve_model

    hf = resolve_model("smollm2-135m").path
    spec = build_tokenizer_spec(hf)
    gguf = export_gguf(hf, tmp_path / "smollm2-f16.gguf", outtype="f16", tokenizer_spec=spec)
    assert check_gguf(gguf, hf, spec=spec) == []
    tok = AutoTokenizer.from_pretrained(str(hf))
    r = L.tokenizer_parity(
        L.SAMPLE_TEXTS, [tok.encode(t) for t in L.SAMPLE_TEXTS], L.tokenize(gguf, L.SAMPLE_TEXTS)
    )
    assert r.ok, r.problems
    ref = L.MlxReference(hf)
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "What is the capital of France?"}], tokenize=False
    )
    ids = tok.encode(chat + "<|im_start|>assistant\n")
    r = L.logprob_parity(ref.logprobs(ids), L.top_logprobs(gguf, ids, k=10), **L.LOGPROB_TOLERANCE["f16"])
    assert r.ok, (r.problems, r.metrics)
    gen = L.generate(gguf, [ids], max_tokens=8)[0]
    assert L.greedy_parity([ref.greedy(ids, 8, stop_ids=[tok.eos_token_id])], [gen.tokens]).ok
    assert "Paris" in gen.text
