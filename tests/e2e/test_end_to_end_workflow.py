"""Tier 1: the whole workflow through the CLI with the model and trainer mocked (< 30 s, always in CI).

The fakes (tests/fakes.py) replace only the model (a locally trained toy tokenizer + a SmolLM2-shaped
config) and the trainer (it writes the files train_run writes). Config, data preparation, templates, memory
estimation, orchestration, the run directory's own config, signals, every gate and error handling are real.
"""

from __future__ import annotations

import io
import json
import shutil
import signal
from dataclasses import replace
from hashlib import sha256
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

from finetune import cli
from finetune.config.loader import ConfigError, list_profiles, load_config
from finetune.data.templates import get_template
from finetune.gates import registry
from finetune.report.models import read_report
from finetune.system.hashing import dir_sha256
from finetune.system.owned import MARKER
from finetune.system.signals import Interrupted
from finetune.train.memory import from_run_config
from tests.fakes import SMOLLM2_SHAPE, FakeTrainer, fake_deps
from tests.unit.recipes.test_pipeline import World

TRAINING_GATES = registry.TRAINING_GATES  # what `finetune run` requires (finetune.gates.registry)


def deps(tokenizer, tmp_path, trainer=None, calls=None):
    return fake_deps(tokenizer, tmp_path / "models", trainer, calls)


def run_cli(argv, d=None) -> tuple[int, str]:
    out = io.StringIO()
    code = cli.main(argv, deps=d, out=out)
    return code, out.getvalue()


def gates_of(run_dir: Path) -> dict[str, str]:
    return {g.name: g.status for g in read_report(run_dir).gates}


# ---------------------------------------------------------------- every profile, through the CLI


@pytest.mark.parametrize("profile", list_profiles())
def test_every_profile_runs_end_to_end_and_is_judged_by_every_seed_gate(profile, tmp_path, toy_tokenizer):
    calls, trainer, run = [], FakeTrainer(), tmp_path / "run"
    code, out = run_cli(
        ["run", "--profile", profile, "--run-dir", str(run)], deps(toy_tokenizer, tmp_path, trainer, calls)
    )
    assert code == 0, out
    assert calls == ["model", "data", "estimate", "train", "learning", "memory"]
    report = read_report(run)
    assert [s.name for s in report.stages] == ["model", "data", "estimate", "train", "judge"]
    assert report.status == "passed" and all(s.status == "passed" for s in report.stages)
    assert sorted(gates_of(run)) == sorted(TRAINING_GATES) and set(gates_of(run).values()) == {"passed"}
    assert all(g.why and g.measured is not None for g in report.gates), (
        "every verdict says why and what it measured"
    )
    assert trainer.calls[0]["cfg"] == load_config(profile)
    assert load_config(None, run / "config.yaml").model_dump() == load_config(profile).model_dump(), (
        "the run owns its config"
    )
    for split in ("train", "valid", "test"):
        assert (run / "data" / f"{split}.jsonl").stat().st_size > 0
    assert f"report: {run / 'report.json'}" in out
    for gate in TRAINING_GATES:  # the CLI prints every verdict with its measured value
        assert f"[PASS] {gate}: measured " in out


def test_lr_zero_fails_the_loss_and_update_gates_and_the_run(tmp_path, toy_tokenizer):
    code, out = run_cli(["run", "-p", "quick", "--set", "training.learning_rate=0", "--run-dir", str(tmp_path / "r")],
                        deps(toy_tokenizer, tmp_path))  # fmt: skip
    assert code == 1
    assert (
        "[FAIL] loss_convergence: measured 1 vs 0.95: initial 3.0000 -> final 3.0000 (x1.000, window 5)"
        in out
    )
    gates = gates_of(tmp_path / "r")
    assert gates["parameter_updates"] == "failed" and gates["model_learning"] == "failed"
    assert "[FAIL] validation_loss: measured 0 vs 0.02: 0 (needs >= 0.02)" in out  # judged from its row alone
    assert read_report(tmp_path / "r").status == "failed"


def test_train_is_never_called_passed(tmp_path, toy_tokenizer):
    code, out = run_cli(
        ["train", "-p", "quick", "--run-dir", str(tmp_path / "t")], deps(toy_tokenizer, tmp_path)
    )
    report = read_report(tmp_path / "t")
    assert code == 0 and report.status == "not_judged" and report.gates == []
    assert "NOT_JUDGED" in out


def test_a_truncated_adapter_fails_validate_naming_the_gate(tmp_path, toy_tokenizer):
    run = tmp_path / "r"
    assert run_cli(["run", "-p", "quick", "--run-dir", str(run)], deps(toy_tokenizer, tmp_path))[0] == 0
    data = (run / "adapter/adapters.safetensors").read_bytes()
    (run / "adapter/adapters.safetensors").write_bytes(data[: len(data) // 2])
    code, out = run_cli(["validate", str(run)], deps(toy_tokenizer, tmp_path))
    assert code == 1 and "[FAIL] artifacts:" in out and "truncated" in out
    assert read_report(run).command == "validate"


def test_a_skipped_gate_is_reported_and_allowed_only_when_asked(tmp_path, toy_tokenizer):
    run = tmp_path / "r"
    code, out = run_cli(["run", "-p", "quick", "--set", "gates.skip=[memory_efficiency]", "--run-dir", str(run)],
                        deps(toy_tokenizer, tmp_path))  # fmt: skip
    report = read_report(run)
    assert code == 0 and gates_of(run)["memory_efficiency"] == "skipped"
    assert report.allowed_skips and "memory_efficiency" in report.allowed_skips[0]


# ---------------------------------------------------------------- the run directory owns its config


def test_interrupt_prints_a_complete_resume_command_that_continues_with_the_runs_config(
    tmp_path, toy_tokenizer
):
    run = tmp_path / "r"
    trainer = FakeTrainer(interrupt_at=5, interrupt=Interrupted(signal.SIGTERM))
    code, out = run_cli(["run", "-p", "quick", "--set", "training.iters=20", "--run-dir", str(run)],
                        deps(toy_tokenizer, tmp_path, trainer))  # fmt: skip
    resume = f"finetune run --run-dir {run.absolute()} --resume"
    assert code == 143 and f"interrupted; resume with: {resume}" in out
    report = read_report(run)
    assert report.status == "interrupted" and report.resume_command == resume
    trainer = FakeTrainer()
    code, out = run_cli(resume.split()[1:], deps(toy_tokenizer, tmp_path, trainer))
    assert code == 0, out
    assert trainer.calls[0]["cfg"].training.iters == 20 and trainer.calls[0]["cfg"].profile == "quick"
    assert trainer.calls[0]["resume"] is True, "the checkpoint on disk belongs to these inputs: continue it"


def test_options_that_differ_from_the_runs_config_are_refused_naming_the_keys(
    tmp_path, toy_tokenizer, capsys
):
    run = tmp_path / "r"
    assert run_cli(["train", "-p", "quick", "--run-dir", str(run)], deps(toy_tokenizer, tmp_path))[0] == 0
    code, _ = run_cli(
        ["run", "-p", "default", "--run-dir", str(run), "--resume"], deps(toy_tokenizer, tmp_path)
    )
    err = capsys.readouterr().err
    assert (
        code == 2
        and "training.iters: run has 48, given 200" in err
        and "lora.num_layers: run has 8, given -1" in err
    )


def test_an_override_of_an_allowed_key_is_applied_and_recorded(tmp_path, toy_tokenizer, capsys):
    run = tmp_path / "r"
    assert run_cli(["train", "-p", "quick", "--run-dir", str(run)], deps(toy_tokenizer, tmp_path))[0] == 0
    trainer = FakeTrainer()
    code, _ = run_cli(["train", "--run-dir", str(run), "--resume", "--override", "training.iters=40"],
                      deps(toy_tokenizer, tmp_path, trainer))  # fmt: skip
    assert code == 0 and trainer.calls[0]["cfg"].training.iters == 40
    assert load_config(None, run / "config.yaml").training.iters == 40
    assert json.loads((run / "overrides.jsonl").read_text().splitlines()[0])["old"] == 48
    code, _ = run_cli(
        ["train", "--run-dir", str(run), "--override", "lora.rank=4"], deps(toy_tokenizer, tmp_path)
    )
    assert code == 2 and "lora.rank changes what this run trains" in capsys.readouterr().err


# ---------------------------------------------------------------- the stage cache: content, not sizes


def pipeline(world, run, trainer=None, *sets, **deps_overrides) -> tuple[int, str]:
    """`finetune pipeline` on World's fake shipping tools; the first call sets the config, later ones rerun."""
    given = [] if (run / "config.yaml").exists() else ["-p", "release", "--set", "data.num_examples=40"]
    argv = ["pipeline", "-q", *given, *[a for s in sets for a in ("--set", s)], "--run-dir", str(run)]
    world.calls.clear()
    return run_cli(argv, replace(world.deps(trainer), **deps_overrides))


def stages_of(run: Path) -> dict[str, str]:
    return {s.name: "cached" if s.cached else s.status for s in read_report(run).stages}


def test_an_adapter_replaced_by_a_same_sized_one_is_named_retrained_and_judged_again(tmp_path, toy_tokenizer):
    world, run, trainer = World(tmp_path, toy_tokenizer), tmp_path / "run", FakeTrainer()
    assert pipeline(world, run, trainer)[0] == 0
    adapter, init = run / "adapter" / "adapters.safetensors", run / "adapter_init" / "adapters.safetensors"
    trained = adapter.read_bytes()
    assert len(init.read_bytes()) == len(trained) and init.read_bytes() != trained  # sizes cannot tell
    shutil.copy2(init, adapter)  # same size, and copy2 even keeps the mtime
    code, out = pipeline(world, run, trainer)
    assert code == 0, out
    assert "[train] adapter/adapters.safetensors changed since it was recorded (sha256 " in out
    assert ": rerunning from train" in out and "[judge] rerunning: train's artifacts changed" in out
    assert stages_of(run) == {"model": "cached", "data": "cached", **dict.fromkeys(
        ["train", "judge", "fuse", "gguf", "ollama", "evaluate"], "passed")}  # fmt: skip
    assert [c["resume"] for c in trainer.calls] == [False, True] and adapter.read_bytes() == trained
    assert world.calls == ["fuse", "gguf", "serve", "served_checks", "evaluate"]
    judged = [
        g.artifact for g in read_report(run).gates if g.artifact and g.artifact["path"].endswith("adapter")
    ]
    assert judged and {a["sha256"] for a in judged} == {dir_sha256(run / "adapter")[0]}


def tree(folder: Path) -> dict[str, str]:
    """Every entry under folder with its content hash ("dir" for folders)."""
    return {str(p.relative_to(folder)): sha256(p.read_bytes()).hexdigest() if p.is_file() else "dir"
            for p in sorted(folder.rglob("*"))}  # fmt: skip


def test_a_users_folder_is_refused_by_every_command_and_left_byte_identical(tmp_path, toy_tokenizer):
    # a project folder holding files under every name a run uses (data/train.jsonl, checkpoints/, metrics.jsonl,
    # hidden *.tmp, a real config.yaml...) used to be overwritten and pruned by `--run-dir`, exit 0
    world, run = World(tmp_path, toy_tokenizer), tmp_path / "run"
    assert pipeline(world, run, FakeTrainer())[0] == 0
    mine = tmp_path / "project"
    for path in sorted(run.rglob("*")):
        rel, target = path.relative_to(run), mine / path.relative_to(run)
        if rel.name == MARKER:
            continue
        if path.is_dir():
            target.mkdir(parents=True, exist_ok=True)
            (target / ".notes.tmp").write_text(f"the user's draft in {rel}\n")
        else:
            target.parent.mkdir(
                parents=True, exist_ok=True
            )  # config.yaml stays a valid config: no marker alone
            target.write_bytes(
                path.read_bytes() if rel.name == "config.yaml" else f"the user's {rel}\n".encode()
            )
    before = tree(mine)
    assert len(before) > 40 and "data/train.jsonl" in before and "checkpoints" in before
    commands = [["run", "-p", "quick"], ["train", "-p", "quick"], ["pipeline", "-p", "release"], ["run"],
                ["pipeline", "--resume"], ["run", "--override", "training.iters=3"]]  # fmt: skip
    for argv in [[*a, "--run-dir", str(mine)] for a in commands] + [["validate", str(mine)]]:
        code, out = run_cli(argv, world.deps(FakeTrainer()))
        assert code == 2, (argv, out)
        assert tree(mine) == before, f"{argv} changed the user's folder"
    code, _ = run_cli(["prepare", "-p", "quick", "--out", str(mine / "data")], world.deps(FakeTrainer()))
    assert code == 2 and tree(mine) == before


def test_refusals_of_a_users_folder_say_why_and_what_to_do(tmp_path, toy_tokenizer, capsys):
    mine = tmp_path / "project"
    (mine / "data").mkdir(parents=True)
    (mine / "data" / "train.jsonl").write_text('{"text": "mine"}\n')
    assert run_cli(["run", "-p", "quick", "--run-dir", str(mine)], deps(toy_tokenizer, tmp_path))[0] == 2
    err = capsys.readouterr().err
    assert f"--run-dir {mine}: the folder exists, is not empty (data) and was not created by FineTune" in err
    assert f"give a new path such as {mine / 'finetune-run'}" in err
    (mine / "config.yaml").write_text(yaml.safe_dump(load_config("quick").to_dict()))
    assert run_cli(["run", "--run-dir", str(mine), "--resume"], deps(toy_tokenizer, tmp_path))[0] == 2
    assert f"{mine}: its config.yaml was not written by FineTune (no {MARKER})" in capsys.readouterr().err
    code, out = run_cli(
        ["run", "-p", "quick", "--run-dir", str(mine / "finetune-run")], deps(toy_tokenizer, tmp_path)
    )
    assert code == 0, out  # the suggested path works, and the user's files are untouched
    assert (mine / "data" / "train.jsonl").read_text() == '{"text": "mine"}\n'


class ResumeDoesNothing(FakeTrainer):
    """A resume at the last step that returns without saving the adapter again (what must not pass)."""

    def __call__(self, cfg, model_path, data_dir, run_dir, *, resume=False, **kw):
        if resume:
            self.calls.append({"cfg": cfg, "data_dir": Path(data_dir), "resume": resume})
            return SimpleNamespace(to_dict=lambda: {"steps": cfg.training.iters})
        return super().__call__(cfg, model_path, data_dir, run_dir, resume=resume, **kw)


def test_a_resume_that_does_not_remake_the_adapter_fails_and_reports_no_old_verdict(tmp_path, toy_tokenizer):
    world, run, trainer = World(tmp_path, toy_tokenizer), tmp_path / "run", ResumeDoesNothing()
    assert pipeline(world, run, trainer)[0] == 0
    shutil.copy2(run / "adapter_init" / "adapters.safetensors", run / "adapter" / "adapters.safetensors")
    code, out = pipeline(world, run, trainer)
    assert code == 1 and "[train] adapter/adapters.safetensors changed since it was recorded" in out
    assert f"training returned without writing {run.absolute() / 'adapter'}" in out
    assert stages_of(run)["train"] == "failed" and stages_of(run)["judge"] == "skipped"
    assert {g.status for g in read_report(run).gates} == {"skipped"}, (
        "no verdict outlives the bytes it judged"
    )


def test_a_changed_checkpoint_is_not_resumed_from(tmp_path, toy_tokenizer):
    world, run, trainer = World(tmp_path, toy_tokenizer), tmp_path / "run", FakeTrainer()
    assert pipeline(world, run, trainer)[0] == 0
    (ckpt,) = (run / "checkpoints").iterdir()
    shutil.copy2(run / "adapter_init" / "adapters.safetensors", ckpt / "adapters.safetensors")
    shutil.copy2(run / "adapter_init" / "adapters.safetensors", run / "adapter" / "adapters.safetensors")
    code, out = pipeline(world, run, trainer)
    assert code == 0, out
    assert f"checkpoints/{ckpt.name}/adapters.safetensors changed since training finished" in out
    assert [c["resume"] for c in trainer.calls] == [False, False]


def test_an_edited_data_file_is_prepared_and_trained_on_again(tmp_path, toy_tokenizer):
    world, run, trainer = World(tmp_path, toy_tokenizer), tmp_path / "run", FakeTrainer()
    data = tmp_path / "mine.jsonl"
    rows = [{"messages": [{"role": "user", "content": f"What is item {i}?"},
                          {"role": "assistant", "content": f"Item {i} is red."}]} for i in range(40)]  # fmt: skip
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert pipeline(world, run, trainer, f"data.source={data}")[0] == 0
    data.write_text(data.read_text().replace("red", "tan"))  # same size, same path, other answers
    code, out = pipeline(world, run, trainer)
    assert code == 0, out
    assert f"[data] rerunning: {data} (data.source) changed since it was recorded (sha256 " in out
    assert stages_of(run)["data"] == "passed" and stages_of(run)["train"] == "passed"
    assert stages_of(run)["model"] == "cached" and [c["resume"] for c in trainer.calls] == [False, False]
    trained_on = (trainer.calls[-1]["data_dir"] / "train.jsonl").read_text()
    assert "tan" in trained_on and "red" not in trained_on


@pytest.mark.parametrize(
    ("tool", "first", "then", "reran", "calls"),
    [("llama.cpp-converter", "2026.10.11549", "2026.11.00001", "gguf", ["gguf", "serve", "served_checks", "evaluate"]),
     ("ollama", "0.5.4", "0.6.0", "ollama", ["serve", "served_checks", "evaluate"])],
)  # fmt: skip
def test_a_new_converter_or_ollama_version_reruns_its_stage_and_what_follows(
    tmp_path, toy_tokenizer, tool, first, then, reran, calls
):
    world, run, have = World(tmp_path, toy_tokenizer), tmp_path / "run", {"version": first}
    versions = {"tool_version": lambda name: have["version"] if name == tool else f"{name}-1.0",
                "ollama_version": lambda binary: have["version"] if tool == "ollama" else "0.5.4"}  # fmt: skip
    assert pipeline(world, run, None, **versions)[0] == 0
    assert pipeline(world, run, None, **versions)[1].count("rerunning") == 0  # unchanged: all cached
    have["version"] = then
    code, out = pipeline(world, run, None, **versions)
    assert code == 0, out
    assert f"[{reran}] rerunning: {tool} {first} → {then}" in out
    assert world.calls == calls and stages_of(run)["fuse"] == "cached"
    assert json.loads((run / "stages" / f"{reran}.json").read_text())["inputs"]["tools"][tool] == then


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
    code, _ = run_cli(
        ["prepare", "-c", str(user), "--out", str(tmp_path / "o")], deps(toy_tokenizer, tmp_path)
    )
    assert code == 2, "3 of 15 rows dropped is more than data.max_rejected's default 5%"
    user.write_text(f"data:\n  source: {src}\n  template: alpaca\n  max_rejected: 0.25\n")
    code, out = run_cli(
        ["prepare", "-c", str(user), "--out", str(tmp_path / "out")], deps(toy_tokenizer, tmp_path)
    )
    assert code == 0
    report = json.loads(out)
    assert report["rows_read"] == 15 and report["rows_used"] == 12 and report["duplicates_removed"] == 1
    assert [r["line"] for r in report["rejected"]] == [6, 7]
    assert "missing field 'output'" in report["rejected"][1]["reason"]
    assert report["length_unit"] == "tokens" and sum(report["split_counts"].values()) == 12
    first = (tmp_path / "out/train.jsonl").read_text()
    run_cli(["prepare", "-c", str(user), "--out", str(tmp_path / "again")], deps(toy_tokenizer, tmp_path))
    assert (tmp_path / "again/train.jsonl").read_text() == first, "same seed must give the same split"


# ---------------------------------------------------------------- memory estimate


def test_memory_estimate_sanity(tmp_path, toy_tokenizer):
    def total(**sets):
        cfg = load_config(overrides=[f"{k}={v}" for k, v in sets.items()])
        return from_run_config(SMOLLM2_SHAPE, cfg)

    lora, full = total(), total(**{"training.fine_tune_type": "full"})
    assert lora.total_bytes < full.total_bytes and lora.trainable_params < full.trainable_params
    assert total(**{"training.batch_size": 8}).total_bytes > lora.total_bytes
    assert total(**{"data.max_seq_length": 512}).total_bytes > lora.total_bytes
    ckpt = total(**{"training.grad_checkpoint": "true"})
    assert ckpt.breakdown["activations"] < lora.breakdown["activations"]
    code, out = run_cli(["estimate", "-p", "low-memory", "--json"], deps(toy_tokenizer, tmp_path))
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
    code, out = run_cli(["run", "-p", "quick", "--set", f"data.source={missing}", "--run-dir", str(tmp_path / "r1")],
                        deps(toy_tokenizer, tmp_path))  # fmt: skip
    assert code == 2 and f"DatasetNotFoundError: {missing}: dataset file not found" in out
    report = read_report(tmp_path / "r1")
    assert report.status == "bad_input" and [s.status for s in report.stages][:3] == [
        "passed",
        "failed",
        "skipped",
    ]

    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    code, out = run_cli(["run", "-p", "quick", "--set", f"data.source={empty}", "--run-dir", str(tmp_path / "r2")],
                        deps(toy_tokenizer, tmp_path))  # fmt: skip
    assert code == 2 and f"{empty}: no usable rows (no records found)" in out


def test_a_broken_profile_is_refused_with_its_file_and_line(tmp_path):
    from finetune.config.loader import CONFIG_DIR

    (tmp_path / "base.yaml").write_text((CONFIG_DIR / "base.yaml").read_text())
    (tmp_path / "broken.yaml").write_text("extends: base\ntraining:\n  batch_size: many\n")
    with pytest.raises(
        ConfigError, match=r"broken.yaml:3: training.batch_size: Input should be a valid integer"
    ):
        load_config("broken", config_dir=tmp_path)


# ---------------------------------------------------------------- history: trends and the regression check


class SlowTrainer(FakeTrainer):
    """A planted regression: the same training, 2 s slower."""

    def __call__(self, *a, **kw):
        import time

        time.sleep(2.0)
        return super().__call__(*a, **kw)


def test_history_shows_every_run_and_check_fails_on_a_planted_slowdown(tmp_path, toy_tokenizer, monkeypatch):
    history = tmp_path / "history.jsonl"
    monkeypatch.setenv("FT_HISTORY", str(history))
    for i in range(3):
        code, out = run_cli(
            ["run", "-p", "quick", "--run-dir", str(tmp_path / f"r{i}")], deps(toy_tokenizer, tmp_path)
        )
        assert code == 0, out
    code, out = run_cli(["history"])
    assert code == 0 and "3 runs" in out, out
    assert "train" in out and "loss_convergence" in out and "memory_efficiency" in out, out
    code, out = run_cli(["history", "--check"])
    assert code == 0 and "history check: no regression" in out, out

    slow = deps(toy_tokenizer, tmp_path, SlowTrainer())
    code, out = run_cli(["run", "-p", "quick", "--run-dir", str(tmp_path / "slow")], slow)
    assert code == 0, out  # the run itself is fine: only the history sees that it got slower
    code, out = run_cli(["history", "--check"])
    assert code == 1, out
    assert "stage train seconds" in out and "regression(s)" in out, out
    assert len(history.read_text().splitlines()) == 4
