"""`finetune export RUN_A RUN_B --as gguf-lora --out DIR`: what is refused before any work (the shipping itself runs
for real on the tiny GPT-2 in the fault suite and on SmolLM2 in tier 3)."""

from __future__ import annotations

import io
from pathlib import Path
from types import SimpleNamespace

from finetune import cli, faults
from finetune.recipes.export_shared import _names
from tests.unit.recipes.test_export_adapter import a_run


def deps(tiny_hf, binary=None):
    return SimpleNamespace(resolve_model=lambda spec: SimpleNamespace(path=tiny_hf),
                           locate_ollama=lambda: SimpleNamespace(binary=binary, reason="run `make ollama`"))  # fmt: skip


def export(args, d):
    return cli.main(["export", *map(str, args)], deps=d, out=io.StringIO())


def test_several_runs_need_an_out_folder_gguf_lora_and_ollama(tmp_path, tiny_hf, capsys):
    a, b = a_run(tmp_path / "a", tiny_hf), a_run(tmp_path / "b", tiny_hf)
    assert export([a, b, "--as", "gguf-lora"], deps(tiny_hf)) == 2
    assert "2 runs share one base GGUF: name the folder it ships in with --out DIR" in capsys.readouterr().err
    assert export([a, b, "--as", "peft", "--out", tmp_path / "o"], deps(tiny_hf)) == 2
    assert "--as peft exports one run" in capsys.readouterr().err
    assert export([a, b, "--as", "gguf-lora", "--out", tmp_path / "o"], deps(tiny_hf)) == 2
    assert "needs Ollama: run `make ollama`" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_runs_on_different_bases_are_refused_naming_each(tmp_path, tiny_hf, capsys):
    a, b = a_run(tmp_path / "a", tiny_hf), a_run(tmp_path / "b", tiny_hf)
    d = SimpleNamespace(resolve_model=lambda spec: SimpleNamespace(path=tmp_path / spec),
                        locate_ollama=lambda: SimpleNamespace(binary=Path("ollama"), reason=""))  # fmt: skip
    (b / "config.yaml").write_text((b / "config.yaml").read_text().replace("tiny-llama", "smollm2-135m"))
    assert export([a, b, "--as", "gguf-lora", "--out", tmp_path / "o"], d) == 2
    err = capsys.readouterr().err
    assert "must share their base model; they differ" in err and "tiny-llama" in err and "smollm2-135m" in err


def test_a_run_named_twice_is_refused(tmp_path, tiny_hf, capsys):
    a = a_run(tmp_path / "a", tiny_hf)
    assert export([a, a, "--as", "gguf-lora", "--out", tmp_path / "o"], deps(tiny_hf, Path("ollama"))) == 2
    assert "is named twice" in capsys.readouterr().err and not (tmp_path / "o").exists()


def test_two_runs_of_one_name_get_distinct_folders(tmp_path):
    assert _names([tmp_path / "a" / "run", tmp_path / "b" / "run", tmp_path / "geo"]) == [
        "run",
        "run-2",
        "geo",
    ]


def test_planted_swap_gives_each_model_the_next_runs_adapter(plant_fault):
    plant_fault("adapters_swapped")
    assert faults.point("adapters_swapped", ["geo.gguf", "math.gguf"]) == ["math.gguf", "geo.gguf"]
