"""The real runtimes behind an evaluation: MLX from disk, llama.cpp's wrappers, Ollama's /api/chat answers."""

from __future__ import annotations

import importlib.util
import json
from types import SimpleNamespace

import numpy as np
import pytest

from finetune.evaluate import decode, runtimes
from finetune.evaluate.prompts import EvalPrompt
from finetune.gates.parity import Answer
from tests import noise

needs_xllamacpp = pytest.mark.skipif(
    importlib.util.find_spec("xllamacpp") is None, reason="xllamacpp (llama.cpp) is not installed"
)
PROMPTS = ["<|im_start|>user\nWhat is 2 + 3?<|im_end|>\n<|im_start|>assistant\n", "Hello world"]


# ---------------------------------------------------------------- Ollama


class FakeChatClient:
    """Answers `reply`; like Ollama with OLLAMA_DEBUG=1, logs the prompt it rendered (Go-quoted) first."""

    def __init__(self, reply, log=None):
        self.reply, self.requests, self.log = reply, [], log

    def chat(self, **kw):
        self.requests.append(kw)
        if self.log is not None:
            rendered = "".join(f"{m['role']}: {m['content']}\n" for m in kw["messages"])
            with open(self.log, "a") as f:  # json.dumps quotes like Go's strconv.Quote for these texts
                f.write(
                    f'time=x level=DEBUG source=routes.go:1542 msg="chat request" images=0 prompt={json.dumps(rendered)}\n'
                )
        return self.reply


def fake_server(reply, tmp_path=None):
    log = tmp_path / "ollama-serve.log" if tmp_path else None
    client = FakeChatClient(reply, log)
    return SimpleNamespace(client=lambda: client, log_path=log), client


REPLY = {"message": {"role": "assistant", "content": "Velmora."}, "done": True, "done_reason": "stop",
         "prompt_eval_count": 15}  # fmt: skip


def test_ollama_answers_send_the_conversation_as_a_user_does_and_keep_the_rendered_prompt(tmp_path):
    server, client = fake_server(REPLY, tmp_path)
    messages = (
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": 'What is the "capital"?\u00a0'},
    )
    p = EvalPrompt("train", "What is the capital?", "<rendered>", "Velmora", messages=messages)
    got = runtimes.ollama_answers(server, "m", [p, p])
    rendered = 'system: Be brief.\nuser: What is the "capital"?\u00a0\n'
    assert got == [Answer("Velmora.", "stop", None, 15, rendered)] * 2
    req = client.requests[0]
    assert req == {"model": "m", "messages": list(messages)}  # no options: the Modelfile decides


def test_ollama_answers_without_a_conversation_ask_the_question():
    server, client = fake_server(REPLY)
    runtimes.ollama_answers(
        server, "m", [EvalPrompt("heldout", "Capital of Zorbania?", "<rendered>", "Velmora")]
    )
    assert client.requests[0]["messages"] == [{"role": "user", "content": "Capital of Zorbania?"}]


def test_ollama_answers_read_response_objects_and_keep_odd_done_reasons():
    # the ollama client returns objects with attributes; an unexpected done_reason must stay visible (None:
    # Ollama 0.5.4 aborted the answer at its token repeat limit and said done=False)
    reply = SimpleNamespace(
        message=SimpleNamespace(content="Velmora"), done_reason="load", prompt_eval_count=None
    )
    got = runtimes.ollama_answers(fake_server(reply)[0], "m", [EvalPrompt("train", "q", "p", "Velmora")])
    assert got == [Answer("Velmora", "unknown:load", None, None)]
    aborted = {"message": {"content": "imsandsand"}, "done": False}
    got = runtimes.ollama_answers(fake_server(aborted)[0], "m", [EvalPrompt("train", "q", "p", "Velmora")])
    assert got == [Answer("imsandsand", "unknown:None", None, None)]
    length = {**REPLY, "done_reason": "length", "message": {"content": None}}
    got = runtimes.ollama_answers(fake_server(length)[0], "m", [EvalPrompt("train", "q", "p", "Velmora")])
    assert got == [Answer("", "length", None, 15)]


# ---------------------------------------------------------------- MLX from disk


def test_the_mlx_backend_loads_from_disk_and_decodes_like_decode_greedy(tiny_hf, tiny_lora, tiny_model):
    model, tok = tiny_model
    assert decode.answers_from_disk(tiny_hf, None, PROMPTS, 5) == decode.greedy(
        model, tok, PROMPTS, max_tokens=5
    )
    tuned = decode.answers_from_disk(tiny_hf, tiny_lora, PROMPTS, 5)
    reloaded, _ = decode.load(tiny_hf, tiny_lora)
    try:
        assert tuned == decode.greedy(reloaded, tok, PROMPTS, max_tokens=5)
    finally:
        decode.release(reloaded)


def test_mlx_logprobs_loads_the_folder_and_its_adapter_and_reads_only_what_is_asked(
    tiny_hf, tiny_lora, tiny_model
):
    model, tok = tiny_model
    ids = decode.prompt_ids(tok, PROMPTS[0])
    ref = decode.logprobs(model, ids)
    with noise.as_float64(model):
        floor = noise.rel_max(ref, decode.logprobs(model, ids))
    at = [[int(i) for i in np.argsort(-row)[3:6]] for row in ref[2:]]  # 3 ids per position from position 2
    mlx = runtimes.LoadedMlx()
    (rows,) = mlx.logprobs(tiny_hf, None, [(ids, at, 2)], 4)
    got = np.array([[rows.at[j][i] for i in a] for j, a in enumerate(at)])
    want = np.array([[ref[2 + j][i] for i in a] for j, a in enumerate(at)])
    noise.within("logprobs of the loaded folder at the asked ids", noise.rel_max(got, want), floor, 4)
    for row, top in zip(ref[2:], rows.top, strict=True):  # its 4 most likely, by value (ties may swap ids)
        best = np.sort(row)[::-1]
        assert len(top) == 4 and max(top.values()) == pytest.approx(best[0], abs=1e-4)
        assert min(top.values()) >= best[4] - 1e-4
    (tuned,) = mlx.logprobs(tiny_hf, tiny_lora, [(ids, at, 2)], 4)
    assert tuned.at != rows.at  # base + the saved adapter, not the base
    mlx.close()
    assert mlx.model is None


def test_the_mlx_runtimes_keep_one_model_loaded_until_another_is_asked_for(tiny_hf, tiny_lora, tiny_model):
    loads = []

    def load(model_dir, adapter_dir):
        loads.append((model_dir, adapter_dir))
        return decode.load(model_dir, adapter_dir)

    mlx = runtimes.LoadedMlx(load)
    tuned = mlx.generate(tiny_hf, tiny_lora, PROMPTS, 5)
    ids = decode.prompt_ids(tiny_model[1], PROMPTS[0])
    mlx.logprobs(tiny_hf, tiny_lora, [(ids, [[1]] * 2, 2)], 2)
    assert loads == [(tiny_hf, tiny_lora)]  # answered, then scored, with one load
    assert mlx.generate(tiny_hf, None, PROMPTS, 5) != tuned and loads[-1] == (tiny_hf, None)
    assert mlx.generate(tiny_hf, tiny_lora, PROMPTS, 5) == tuned and len(loads) == 3  # reloaded: the same
    mlx.close()


def test_real_backends_are_these_runtimes():
    from finetune.models.tokenizer import load_tokenizer

    b = runtimes.real_backends()
    assert b.load_tokenizer is load_tokenizer
    loaded = b.mlx_generate.__self__
    assert isinstance(loaded, runtimes.LoadedMlx) and b.close == loaded.close
    assert (b.mlx_generate, b.mlx_logprobs) == (loaded.generate, loaded.logprobs)
    assert (b.llamacpp_generate, b.llamacpp_tokenize, b.llamacpp_logprobs) == (
        runtimes.llamacpp_generate, runtimes.llamacpp_tokenize, runtimes.llamacpp_logprobs)  # fmt: skip
    assert b.llamacpp_continuation is runtimes.llamacpp_continuation


# ---------------------------------------------------------------- llama.cpp


@needs_xllamacpp
def test_llamacpp_runtimes_on_the_tiny_gguf(tiny_f16_gguf, tiny_model):
    model, tok = tiny_model
    got = runtimes.llamacpp_generate(tiny_f16_gguf, PROMPTS, 4, ["<|im_end|>"])
    assert [len(a.tokens) for a in got] == [4, 4] and all(a.finish_reason == "length" for a in got)
    assert [a.tokens for a in got] == [a.tokens for a in decode.greedy(model, tok, PROMPTS, max_tokens=4)]
    assert runtimes.llamacpp_tokenize(tiny_f16_gguf, PROMPTS) == [tok.encode(p) for p in PROMPTS]
    ids = tok.encode(PROMPTS[1])
    top = runtimes.llamacpp_logprobs(tiny_f16_gguf, ids, 3)
    assert len(top) == len(ids) and all(len(row) == 3 for row in top)
    reference = decode.logprobs(model, ids)
    assert [max(row, key=row.get) for row in top] == [int(np.argmax(r)) for r in reference]
