"""quantize_gguf against a stand-in Ollama that does what `ollama create --quantize` does to its store: the model
layer is moved out atomically, the asked type is passed through, and both quantization faults do what they say."""

from __future__ import annotations

import hashlib
import json
import subprocess
from contextlib import contextmanager
from pathlib import Path
from types import SimpleNamespace

import gguf
import numpy as np
import pytest

from finetune.serve.ollama_quantize import (
    MODEL_LAYER,
    NAME,
    decode_speed,
    model_blob,
    quantize_gguf,
    served_speed,
)
from finetune.serve.ollama_server import OllamaCommandError, OllamaServer


def a_gguf(path: Path) -> Path:
    w = gguf.GGUFWriter(str(path), "llama")
    for i in range(3):
        w.add_tensor(f"blk.{i}.ffn_down.weight", np.arange(4 * 32, dtype=np.float32).reshape(4, 32) + i)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path


class FakeOllama:
    """What the private server does with `create NAME -f Modelfile --quantize TYPE`: a manifest and a blob."""

    def __init__(self, fail: str = ""):
        self.asked: list[list[str]] = []
        self.fail = fail

    def __call__(self, binary, run_dir):
        self.store = Path(run_dir) / "models"

        @contextmanager
        def running():
            yield self

        return running()

    create_model = OllamaServer.create_model  # the real command and its error report, over the fake cli

    def cli(self, args, timeout):
        self.asked.append(args)
        if self.fail:
            return subprocess.CompletedProcess(args, 1, "", f"Error: {self.fail}\n")
        blob = a_gguf(self.store.parent / "q.gguf").read_bytes()
        digest = "sha256:" + hashlib.sha256(blob).hexdigest()
        (self.store / "blobs").mkdir(parents=True)
        (self.store / "blobs" / digest.replace(":", "-")).write_bytes(blob)
        manifest = self.store / "manifests" / "registry.ollama.ai" / "library" / NAME / "latest"
        manifest.parent.mkdir(parents=True)
        manifest.write_text(json.dumps({"layers": [{"mediaType": MODEL_LAYER, "digest": digest}]}))
        return subprocess.CompletedProcess(args, 0, "success\n", "")

    def client(self):
        def generate(**kw):
            self.generated.append(kw["model"])
            return {"eval_count": 48, "eval_duration": 2 * 10**9}

        self.generated = getattr(self, "generated", [])
        return SimpleNamespace(generate=generate)


def test_the_quantized_layer_is_moved_out_and_measured(tmp_path):
    ollama, src = FakeOllama(), a_gguf(tmp_path / "f16.gguf")
    q = quantize_gguf(src, tmp_path / "out.gguf", "q4_K_M", binary=Path("ollama"), server=ollama)
    assert ollama.asked[0][-2:] == ["--quantize", "q4_K_M"] and q.path.is_file()
    assert q.ollama_tokens_per_second == 24.0 and sorted(p.name for p in tmp_path.iterdir()) == [
        "f16.gguf",
        "out.gguf",
    ]


def test_without_speed_nothing_is_decoded_and_served_speed_measures_the_shipped_file_later(tmp_path):
    ollama, src = FakeOllama(), a_gguf(tmp_path / "f16.gguf")
    q = quantize_gguf(src, tmp_path / "out.gguf", "q8_0", binary=Path("ollama"), server=ollama, speed=False)
    assert q.ollama_tokens_per_second is None and getattr(ollama, "generated", []) == []
    later = FakeOllama()
    assert served_speed(q.path, binary=Path("ollama"), server=later) == 24.0
    assert "--quantize" not in later.asked[0] and later.generated == [NAME]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f16.gguf", "out.gguf"]  # its store was temporary


def test_a_type_ollama_refuses_is_an_error_naming_it_and_writes_nothing(tmp_path):
    src = a_gguf(tmp_path / "f16.gguf")
    with pytest.raises(OllamaCommandError, match="--quantize q4_K_M .* unsupported quantization type"):
        quantize_gguf(src, tmp_path / "out.gguf", "q4_K_M", binary=Path("ollama"),
                      server=FakeOllama("unsupported quantization type"))  # fmt: skip
    assert [p.name for p in tmp_path.iterdir()] == ["f16.gguf"]


def test_model_blob_reads_the_model_layer_of_the_manifest(tmp_path):
    FakeOllama()(None, tmp_path).__enter__().cli(["create"], 1)
    assert model_blob(tmp_path / "models", NAME).read_bytes()[:4] == b"GGUF"


def test_decode_speed_is_none_when_nothing_was_generated():
    assert decode_speed(SimpleNamespace(generate=lambda **kw: {"eval_count": 0}), "m") is None


def test_planted_wrong_type_asks_ollama_for_another_type(tmp_path, plant_fault):
    plant_fault("quant_wrong_type")
    ollama = FakeOllama()
    quantize_gguf(
        a_gguf(tmp_path / "f16.gguf"), tmp_path / "out.gguf", "q4_K_M", binary=Path("x"), server=ollama
    )
    assert ollama.asked[0][-1] == "q4_0"


def test_planted_damage_shifts_one_middle_tensors_rows_and_nothing_else(tmp_path, plant_fault):
    plant_fault("quant_tensor_damaged")
    out = quantize_gguf(a_gguf(tmp_path / "f16.gguf"), tmp_path / "out.gguf", "q8_0", binary=Path("x"),
                        server=FakeOllama()).path  # fmt: skip
    got = {t.name: np.array(t.data) for t in gguf.GGUFReader(out).tensors}
    want = {t.name: np.array(t.data) for t in gguf.GGUFReader(a_gguf(tmp_path / "again.gguf")).tensors}
    assert np.array_equal(got["blk.1.ffn_down.weight"], np.roll(want["blk.1.ffn_down.weight"], 1, axis=0))
    assert all(np.array_equal(got[n], want[n]) for n in want if n != "blk.1.ffn_down.weight")
