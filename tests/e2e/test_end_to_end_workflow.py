"""Tier 1: the whole workflow through the CLI with the model and trainer mocked (< 30 s, always in CI).

The fakes replace only the model (a locally trained toy tokenizer + a SmolLM2-shaped config) and
the trainer (writes metrics and adapter files the way train_run does). Config, data preparation,
templates, memory estimation, orchestration, gates and error handling are all real.
"""

from __future__ import annotations

import io
import json
import math
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from finetune import cli
from finetune.config import ConfigError, list_profiles, load_config
from finetune.runner import estimate_for, prepare_data, workflow_gates
from finetune.templates import get_template
from finetune.workflow import Stages

SMOLLM2_SHAPE = {
    "model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True,
    "torch_dtype": "float32",  # what models.py builds; in bf16 LoRA can cost more than full
}  # fmt: skip


class FakeTrainer:
    """Writes what train_run writes; the loss falls at a rate set by the learning rate (flat at lr=0)."""

    def __init__(self, interrupt_at: int | None = None):
        self.calls: list[dict] = []
        self.interrupt_at = interrupt_at

    def __call__(self, cfg, model_path, data_dir, run_dir, resume=False):
        self.calls.append({"cfg": cfg, "data_dir": Path(data_dir), "resume": resume})
        assert (Path(data_dir) / "train.jsonl").stat().st_size > 0, "trainer called before data was prepared"
        steps = cfg.training.iters if self.interrupt_at is None else self.interrupt_at
        rate = cfg.training.learning_rate * 100
        rows = [
            {"kind": "train", "step": s, "train_loss": 3.0 * math.exp(-rate * s)} for s in range(1, steps + 1)
        ]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        for sub in ("adapter", f"checkpoints/step-{steps:07d}"):
            (run_dir / sub).mkdir(parents=True, exist_ok=True)
            (run_dir / sub / "adapters.safetensors").write_bytes(b"fake")
            (run_dir / sub / "adapter_config.json").write_text(json.dumps({"fine_tune_type": "lora"}))
        return SimpleNamespace(steps=steps, interrupted=self.interrupt_at is not None,
                               to_dict=lambda: {"steps": steps, "interrupted": self.interrupt_at is not None})  # fmt: skip


def fake_stages(toy_tokenizer, trainer=None, calls=None) -> Stages:
    calls = [] if calls is None else calls

    def record(name, fn):
        def inner(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return inner

    return Stages(
        resolve_model=record(
            "model", lambda spec: SimpleNamespace(path=Path("/models") / spec, config=SMOLLM2_SHAPE)
        ),
        load_tokenizer=record("tokenizer", lambda _path: toy_tokenizer),
        prepare_data=record("data", prepare_data),
        estimate=record("estimate", estimate_for),
        train=record("train", trainer or FakeTrainer()),
        gates=record("gates", workflow_gates),
        log=lambda _msg: None,
    )


def run_cli(argv, stages=None) -> tuple[int, str]:
    out = io.StringIO()
    code = cli.main(argv, stages=stages, out=out)
    return code, out.getvalue()


# ---------------------------------------------------------------- every profile, through the CLI


@pytest.mark.parametrize("profile", list_profiles())
def test_every_profile_runs_end_to_end_through_the_cli(profile, tmp_path, toy_tokenizer):
    calls, trainer = [], FakeTrainer()
    code, out = run_cli(
        ["run", "--profile", profile, "--run-dir", str(tmp_path)], fake_stages(toy_tokenizer, trainer, calls)
    )
    assert code == 0, out
    assert calls == ["model", "tokenizer", "data", "estimate", "train", "gates"]
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert [s["stage"] for s in summary["stages"]] == [
        "model",
        "tokenizer",
        "data",
        "estimate",
        "train",
        "gates",
    ]
    assert summary["passed"] and all(s["status"] == "passed" for s in summary["stages"])
    assert trainer.calls[0]["cfg"] == load_config(profile)
    for split in ("train", "valid", "test"):
        assert (tmp_path / "data" / f"{split}.jsonl").stat().st_size > 0
    assert f"report: {tmp_path / 'summary.json'}" in out


def test_a_broken_profile_is_refused_with_its_file_and_line(tmp_path):
    (tmp_path / "base.yaml").write_text((Path(cli.__file__).parents[1] / "configs/base.yaml").read_text())
    (tmp_path / "broken.yaml").write_text("extends: base\ntraining:\n  batch_size: many\n")
    with pytest.raises(
        ConfigError, match=r"broken.yaml:3: training.batch_size: Input should be a valid integer"
    ):
        load_config("broken", config_dir=tmp_path)


def test_lr_zero_fails_the_loss_gate_and_the_run(tmp_path, toy_tokenizer):
    code, out = run_cli(["run", "-p", "quick", "--set", "training.learning_rate=0", "--run-dir", str(tmp_path)],
                        fake_stages(toy_tokenizer))  # fmt: skip
    assert code == 1
    assert "[FAIL] loss_convergence: initial 3.0000 -> final 3.0000 (x1.000, window 5)" in out
    assert json.loads((tmp_path / "summary.json").read_text())["passed"] is False


def test_resume_and_interrupt_are_passed_through(tmp_path, toy_tokenizer):
    code, out = run_cli(
        ["train", "-p", "quick", "--run-dir", str(tmp_path)], fake_stages(toy_tokenizer, FakeTrainer(5))
    )
    assert code == 130 and f"finetune train --run-dir {tmp_path} --resume" in out
    trainer = FakeTrainer()
    assert run_cli(["train", "-p", "quick", "--run-dir", str(tmp_path), "--resume"],
                   fake_stages(toy_tokenizer, trainer))[0] == 0  # fmt: skip
    assert trainer.calls[0]["resume"] is True


# ---------------------------------------------------------------- templates


CONVO = [{"role": "user", "content": "Capital of Zorbania?"}, {"role": "assistant", "content": "Velmora."}]


def test_templates_render_exact_text_and_trained_spans(toy_tokenizer):
    expected = {
        "chatml": "<|im_start|>user\nCapital of Zorbania?<|im_end|>\n<|im_start|>assistant\nVelmora.<|im_end|>\n",
        "llama3": "<|begin_of_text|><|start_header_id|>user<|end_header_id|>\n\nCapital of Zorbania?<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\nVelmora.<|eot_id|>",
        "llama2": "<s>[INST] Capital of Zorbania? [/INST] Velmora. </s>",
    }
    trained = {
        "chatml": ["Velmora.<|im_end|>"],
        "llama3": ["Velmora.<|eot_id|>"],
        "llama2": [" Velmora. </s>"],
    }
    for name, text in expected.items():
        rendered = get_template(name).render(CONVO)
        assert rendered.text == text, name
        assert [rendered.text[s:e] for s, e in rendered.train_spans] == trained[name], name
    alpaca = get_template("alpaca").render(CONVO)
    assert "### Instruction:\nCapital of Zorbania?" in alpaca.text and alpaca.prompt.endswith(
        "### Response:\n"
    )
    own = get_template("tokenizer", toy_tokenizer).render(CONVO)
    assert own.text == expected["chatml"]


# ---------------------------------------------------------------- config round trip through the CLI


def test_config_show_output_validates_and_round_trips(tmp_path):
    code, shown = run_cli(["config", "show", "--profile", "quality", "--set", "training.iters=9"])
    assert code == 0
    path = tmp_path / "resolved.yaml"
    path.write_text(shown)
    code, out = run_cli(["config", "validate", str(path)])
    assert code == 0 and "valid (profile quality" in out
    assert yaml.safe_load(shown)["training"]["iters"] == 9
    assert load_config(None, path) .model_dump(exclude={"profile"}) == load_config(
        "quality", overrides=["training.iters=9"]).model_dump(exclude={"profile"})  # fmt: skip


# ---------------------------------------------------------------- data preparation and validation


def test_prepare_reports_bad_rows_with_line_numbers(tmp_path, toy_tokenizer):
    src = tmp_path / "mine.jsonl"
    good = [{"instruction": f"Say {i}", "output": f"{i}"} for i in range(12)]
    lines = [json.dumps(r) for r in good[:5]] + ["{not json", json.dumps({"instruction": "no output"})]
    lines += [json.dumps(r) for r in good[5:]] + [json.dumps(good[0])]
    src.write_text("\n".join(lines) + "\n")
    user = tmp_path / "user.yaml"
    user.write_text(f"data:\n  source: {src}\n  template: alpaca\n")
    code, out = run_cli(
        ["prepare", "-c", str(user), "--out", str(tmp_path / "out")], fake_stages(toy_tokenizer)
    )
    assert code == 0
    report = json.loads(out)
    assert report["rows_read"] == 15 and report["rows_used"] == 12 and report["duplicates_removed"] == 1
    assert [r["line"] for r in report["rejected"]] == [6, 7]
    assert "missing field 'output'" in report["rejected"][1]["reason"]
    assert report["length_unit"] == "tokens" and sum(report["split_counts"].values()) == 12
    first = (tmp_path / "out/train.jsonl").read_text()
    run_cli(["prepare", "-c", str(user), "--out", str(tmp_path / "again")], fake_stages(toy_tokenizer))
    assert (tmp_path / "again/train.jsonl").read_text() == first, "same seed must give the same split"


# ---------------------------------------------------------------- memory estimate


def test_memory_estimate_sanity():
    def total(**sets):
        cfg = load_config(overrides=[f"{k}={v}" for k, v in sets.items()])
        return estimate_for(cfg, SMOLLM2_SHAPE)

    lora, full = total(), total(**{"training.fine_tune_type": "full"})
    assert lora.total_bytes < full.total_bytes and lora.trainable_params < full.trainable_params
    assert total(**{"training.batch_size": 8}).total_bytes > lora.total_bytes
    assert total(**{"data.max_seq_length": 512}).total_bytes > lora.total_bytes
    ckpt = total(**{"training.grad_checkpoint": "true"})
    assert ckpt.breakdown["activations"] < lora.breakdown["activations"]
    code, out = run_cli(["estimate", "-p", "low-memory", "--json"], fake_stages(None))
    assert code == 0 and json.loads(out)["total_bytes"] < total().total_bytes


# ---------------------------------------------------------------- errors, with the exact messages


def test_errors_are_specific(tmp_path, toy_tokenizer, capsys):
    bad_yaml = tmp_path / "bad.yaml"
    bad_yaml.write_text("training:\n  iters: [1,\n")
    assert run_cli(["config", "validate", str(bad_yaml)])[0] == 2
    assert capsys.readouterr().err.startswith(f"config error: {bad_yaml}:3: invalid YAML")

    unknown = tmp_path / "unknown.yaml"
    unknown.write_text("lora:\n  lora_layers: 4\n")
    assert run_cli(["config", "validate", str(unknown)])[0] == 2
    assert (
        capsys.readouterr().err
        == f"config error: {unknown}:2: lora.lora_layers: unknown key; did you mean num_layers?\n"
    )

    missing = tmp_path / "nope.jsonl"
    code, _ = run_cli(["run", "-p", "quick", "--set", f"data.source={missing}", "--run-dir", str(tmp_path / "r1")],
                      fake_stages(toy_tokenizer))  # fmt: skip
    assert code == 2 and f"data error: {missing}: dataset file not found" in capsys.readouterr().err
    summary = json.loads((tmp_path / "r1/summary.json").read_text())
    assert summary["stages"][-1]["stage"] == "data" and summary["stages"][-1]["status"] == "failed"

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, _ = run_cli(["run", "-p", "quick", "--set", f"data.source={empty}", "--run-dir", str(tmp_path / "r2")],
                      fake_stages(toy_tokenizer))  # fmt: skip
    assert code == 2 and f"data error: {empty}: no usable rows (no records found)" in capsys.readouterr().err
