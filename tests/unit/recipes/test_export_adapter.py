"""`finetune export RUN --as peft` through the CLI on a run dir holding the tiny Llama's adapter."""

from __future__ import annotations

import io
import json
import shutil
from types import SimpleNamespace

import pytest

from finetune import cli
from finetune.config.loader import load_config
from finetune.stages.rundir import own_config
from finetune.system.hashing import dir_sha256
from tests.unit.export.conftest import build_adapter


def export(run, tiny_hf, *extra):
    deps = SimpleNamespace(resolve_model=lambda spec: SimpleNamespace(path=tiny_hf))
    out = io.StringIO()
    return cli.main(["export", str(run), "--as", "peft", *extra], deps=deps, out=out), out.getvalue()


def a_run(tmp_path, tiny_hf):
    run = tmp_path / "run"
    own_config(run, load_config("quick", overrides=["model.name=tiny-llama"]))
    rows = [
        {"text": f"<|im_start|>user\nWhat is {i}?<|im_end|>\n<|im_start|>assistant\n{i}<|im_end|>\n"}
        for i in range(6)
    ]
    (run / "data").mkdir()
    (run / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    build_adapter(tiny_hf, run / "adapter")
    return run


def test_a_runs_adapter_is_exported_and_judged(tmp_path, tiny_hf):
    run = a_run(tmp_path, tiny_hf)
    code, out = export(run, tiny_hf)
    assert code == 0 and "[PASS] peft_parity: " in out and f"exported: {run / 'export' / 'peft'}" in out
    record = json.loads((run / "export" / "peft" / "parity.json").read_text())
    assert record["verdicts"][0]["status"] == "passed" and record["verdicts"][0]["data"]["positions"] > 20
    assert set(record["bytes"]) == {"adapter_config.json", "adapter_model.safetensors"}  # what ships, sized
    assert record["adapter_sha256"] == dir_sha256(run / "adapter")[0]  # the judged adapter, by content
    assert "MiB" in out


def test_a_failed_export_is_not_left_loadable(tmp_path, tiny_hf, plant_fault):
    run = a_run(tmp_path, tiny_hf)
    plant_fault("peft_alpha_missing")
    code, out = export(run, tiny_hf)
    assert code == 4 and "[FAIL] peft_parity: " in out and "NOT shippable" in out
    peft = run / "export" / "peft"
    assert (
        not (peft / "adapter_model.safetensors").exists()
        and (peft / "adapter_model.safetensors.rejected").exists()
    )


def test_a_run_without_an_adapter_or_a_users_folder_is_bad_input(tmp_path, tiny_hf, capsys):
    run = a_run(tmp_path, tiny_hf)
    shutil.rmtree(run / "adapter")
    assert export(run, tiny_hf)[0] == 2 and "no trained adapter" in capsys.readouterr().err
    assert export(tmp_path, tiny_hf)[0] == 2 and "not a FineTune run directory" in capsys.readouterr().err


def test_out_is_a_new_folder_or_refused_when_it_holds_someone_elses_files(tmp_path, tiny_hf, capsys):
    run, mine = a_run(tmp_path, tiny_hf), tmp_path / "mine"
    mine.mkdir()
    (mine / "adapter_model.safetensors").write_bytes(b"the user's own adapter")
    assert export(run, tiny_hf, "--out", str(mine))[0] == 2 and "is not empty" in capsys.readouterr().err
    assert (mine / "adapter_model.safetensors").read_bytes() == b"the user's own adapter"
    code, out = export(run, tiny_hf, "--out", str(tmp_path / "shipped"))
    assert code == 0 and (tmp_path / "shipped" / "adapter_model.safetensors").is_file(), out


def test_an_unknown_form_or_quantization_type_is_refused_naming_the_choices(tmp_path, tiny_hf, capsys):
    run = a_run(tmp_path, tiny_hf)
    deps = SimpleNamespace(resolve_model=lambda spec: SimpleNamespace(path=tiny_hf))
    with pytest.raises(SystemExit) as exit_:
        cli.main(["export", str(run), "--as", "gguf:q3"], deps=deps, out=io.StringIO())
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and "'gguf:q3': choose peft, gguf-lora or a quantized GGUF" in err
    assert "gguf:q4_K_M" in err and not (run / "export").exists()


def test_a_quantized_export_without_ollama_says_where_to_get_it(tmp_path, tiny_hf, capsys):
    run = a_run(tmp_path, tiny_hf)
    deps = SimpleNamespace(resolve_model=lambda spec: SimpleNamespace(path=tiny_hf),
                           locate_ollama=lambda: SimpleNamespace(binary=None, reason="run `make ollama`"))  # fmt: skip
    assert cli.main(["export", str(run), "--as", "gguf:q8_0"], deps=deps, out=io.StringIO()) == 2
    assert (
        "quantizes with Ollama's quantizer, and none was found: run `make ollama`" in capsys.readouterr().err
    )


def test_a_gguf_lora_on_the_wrong_base_fails_and_a_missing_ollama_is_a_skip_not_a_pass(tmp_path, tiny_hf,
                                                                                       plant_fault):  # fmt: skip
    run = a_run(tmp_path, tiny_hf)
    deps = SimpleNamespace(resolve_model=lambda spec: SimpleNamespace(path=tiny_hf),
                           locate_ollama=lambda: SimpleNamespace(binary=None, reason="none here"))  # fmt: skip
    out = io.StringIO()
    assert cli.main(["export", str(run), "--as", "gguf-lora"], deps=deps, out=out) == 3, out.getvalue()
    assert (
        "[PASS] gguf_lora_parity" in out.getvalue() and "[SKIP] served_adapter: no Ollama" in out.getvalue()
    )
    assert "degraded:" in out.getvalue() and (run / "export" / "gguf-lora" / "Modelfile").is_file()
    plant_fault("adapter_wrong_base")
    out = io.StringIO()
    assert cli.main(["export", str(run), "--as", "gguf-lora"], deps=deps, out=out) == 4
    assert (
        "[FAIL] gguf_lora_parity" in out.getvalue() and "a base other than the trained one" in out.getvalue()
    )


def test_an_adapter_ollama_cannot_serve_is_a_skip_with_its_reason_and_the_export_degraded(tmp_path, tiny_hf):
    from contextlib import contextmanager

    from finetune.serve.ollama_server import OllamaCommandError

    @contextmanager
    def refusing(binary, folder):
        def create_model(name, modelfile):
            raise OllamaCommandError(
                f"ollama create {name} -f {modelfile} failed (1): Error: unsupported architecture"
            )

        yield SimpleNamespace(create_model=create_model)

    run = a_run(tmp_path, tiny_hf)
    deps = SimpleNamespace(resolve_model=lambda spec: SimpleNamespace(path=tiny_hf), ollama_server=refusing,
                           locate_ollama=lambda: SimpleNamespace(binary="ollama", reason="found"))  # fmt: skip
    out = io.StringIO()
    assert cli.main(["export", str(run), "--as", "gguf-lora"], deps=deps, out=out) == 3, out.getvalue()
    assert (
        "[SKIP] served_adapter: no training questions to ask the served model" in out.getvalue()
    )  # raw text
    rows = [{"text": f"<|im_start|>user\nWhat is {i}?<|im_end|>\n<|im_start|>assistant\n{i}<|im_end|>\n",
             "conversation": [{"role": "user", "content": f"What is {i}?"}, {"role": "assistant", "content": str(i)}],
             "reference": str(i)} for i in range(6)]  # fmt: skip
    (run / "data" / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    deps = SimpleNamespace(resolve_model=lambda spec: SimpleNamespace(path=tiny_hf), ollama_server=refusing,
                           locate_ollama=lambda: SimpleNamespace(binary="ollama", reason="found"))  # fmt: skip
    out = io.StringIO()
    assert cli.main(["export", str(run), "--as", "gguf-lora"], deps=deps, out=out) == 3, out.getvalue()
    text = out.getvalue()
    assert (
        "[SKIP] served_adapter: Ollama could not serve the adapter" in text
        and "unsupported architecture" in text
    )
    assert "[PASS] gguf_lora_parity" in text and "degraded:" in text


def test_an_architecture_llama_cpp_applies_no_lora_to_is_a_skip_with_its_reason_not_bad_input(
    tmp_path, tiny_hf
):
    base = tmp_path / "base"
    shutil.copytree(tiny_hf, base)
    config = json.loads((base / "config.json").read_text())
    (base / "config.json").write_text(json.dumps({**config, "architectures": ["NotInLlamaCppForCausalLM"]}))
    run = a_run(tmp_path, base)
    deps = SimpleNamespace(resolve_model=lambda spec: SimpleNamespace(path=base),
                           locate_ollama=lambda: SimpleNamespace(binary=None, reason="none here"))  # fmt: skip
    out = io.StringIO()
    assert cli.main(["export", str(run), "--as", "gguf-lora"], deps=deps, out=out) == 3, out.getvalue()
    text = out.getvalue()
    assert "[SKIP] gguf_lora_parity: llama.cpp's convert_lora_to_gguf.py could not convert" in text, text
    assert "NotInLlamaCppForCausalLM" in text and "degraded:" in text
    assert not (run / "export" / "gguf-lora" / "adapter.gguf").exists()
