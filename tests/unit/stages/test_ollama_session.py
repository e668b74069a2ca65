"""The run's one Ollama server: started lazily, models re-created when needed, cleaned up with a record."""

from __future__ import annotations

import contextlib
from dataclasses import replace
from pathlib import Path

from finetune.stages.ollama_session import OllamaSession
from tests.fakes import fake_deps
from tests.unit.recipes.test_pipeline import FakeServer


def test_start_once_recreate_a_missing_model_and_record_cleanup(tmp_path, toy_tokenizer):
    events = []
    deps = replace(fake_deps(toy_tokenizer, tmp_path), ollama_server=lambda b, f: FakeServer(events))
    modelfile = tmp_path / "Modelfile"
    modelfile.write_text('FROM /x.gguf\nTEMPLATE """{{ .Prompt }}"""\nPARAMETER stop "<|im_end|>"\n')
    with contextlib.ExitStack() as stack:
        session = OllamaSession(deps, tmp_path / "ollama", stack)
        a = session.ensure_model(Path("/bin/ollama"), "m", modelfile)
        b = session.ensure_model(Path("/bin/ollama"), "m", modelfile)
        assert a is b and events == ["start", "create:m"]
        session.delete_models()
    assert events == ["start", "create:m", "delete:m", "stop"]
    assert session.cleanup_result == {"m": {"deleted": True, "detail": "deleted"}, "server_stopped": True}
