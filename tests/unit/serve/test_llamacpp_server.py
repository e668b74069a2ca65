"""The llama.cpp child process's own contract: a usage error, and a model llama.cpp cannot load reported as a JSON
error to the parent (not a crash), written atomically."""

from __future__ import annotations

import json

from finetune.serve.llamacpp_server import _child_main


def test_the_child_needs_a_request_and_a_response_path(capsys):
    assert (
        _child_main([]) == 2 and "usage: python -m finetune.serve.llamacpp_server" in capsys.readouterr().err
    )


def test_a_file_llama_cpp_cannot_load_comes_back_as_an_error_response(tmp_path):
    bad = tmp_path / "not-a-model.gguf"
    bad.write_bytes(b"GGUF but nothing else")
    req, resp = tmp_path / "request.json", tmp_path / "response.json"
    req.write_text(json.dumps({"op": "tokenize", "gguf": str(bad), "texts": ["a"], "add_special": True}))
    assert _child_main([str(req), str(resp)]) == 0
    assert set(json.loads(resp.read_text())) == {"error"} and not resp.with_suffix(".tmp").exists()
