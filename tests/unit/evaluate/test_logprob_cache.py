"""The logprob measurement is reused only for the same bytes: same GGUF, adapter and base content, same ids."""

from __future__ import annotations

from tests.unit.evaluate.test_evaluation import Fakes, data_dir, evaluate, prompts  # noqa: F401 (fixtures)


def _files(tmp_path):
    for name in ("base", "adapter"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "weights.safetensors").write_bytes(name.encode() * 100)
    (tmp_path / "m.gguf").write_bytes(b"GGUF" + bytes(100))
    return {"base_dir": tmp_path / "base", "adapter_dir": tmp_path / "adapter", "gguf": tmp_path / "m.gguf",
            "cache_dir": tmp_path / "cache"}  # fmt: skip


def test_the_same_files_reuse_the_measurement(data_dir, prompts, tmp_path):  # noqa: F811 (imported fixtures)
    # and changed bytes, even of the same size, are measured again
    files = _files(tmp_path)
    first_fakes = Fakes(prompts)
    first = evaluate(data_dir, first_fakes, **files)
    assert first.logprob_error is None and hasattr(first_fakes, "long_prompt")
    again_fakes = Fakes(prompts)
    again = evaluate(data_dir, again_fakes, **files)
    assert not hasattr(again_fakes, "long_prompt"), "llama.cpp was asked again for the same files"
    assert not [c for c in again_fakes.calls if c.startswith("logprobs:")], "MLX scored again"
    assert (again.logprob_reference, again.logprob_candidate, again.logprob_long) == (
        first.logprob_reference, first.logprob_candidate, first.logprob_long)  # fmt: skip
    assert len(list(files["cache_dir"].glob("*.json"))) == 2  # the short answers' and the long context's
    # one byte of the GGUF changed, same size: measured again, kept beside the first
    files["gguf"].write_bytes(b"GGUF" + bytes(99) + b"\1")
    changed_fakes = Fakes(prompts)
    evaluate(data_dir, changed_fakes, **files)
    assert hasattr(changed_fakes, "long_prompt") and len(list(files["cache_dir"].glob("*.json"))) == 4
