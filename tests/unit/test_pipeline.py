"""Pipeline orchestration with fakes: order, digest skips, failure recording, degradation, cleanup."""

from __future__ import annotations

import contextlib
import io
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import save_file

from finetune.config import load_config
from finetune.deploy import Check, DeployResult
from finetune.evaluate import EvalOutcome
from finetune.modelfile import ModelfileError, chat_format
from finetune.pipeline import GATES, PipelineDeps, digest_of, pipeline_main, run_pipeline
from finetune.pipeline_stages import STAGES, chat_for_deploy, safetensors_dtypes
from finetune.report import validate_report
from finetune.runner import prepare_data
from finetune.validate import Verdict

NAMES = [n for n, _ in STAGES]
# The server events of one evaluation: the model is created, then deleted before the server stops.
DEPLOY_CYCLE = ["start", "create:finetune-release", "delete:finetune-release", "stop"]


class FakeServer:
    def __init__(self, events, *, fail_start=False):
        self.events, self.fail_start = events, fail_start
        self.models, self.pid, self.version = set(), None, "0.0-fake"

    def __enter__(self):
        if self.fail_start:
            raise RuntimeError("serve exited with code 1: libsycl.so.8 missing")
        self.pid = 4242
        self.events.append("start")
        return self

    def __exit__(self, *exc):
        self.pid = None
        self.events.append("stop")

    def create_model(self, name, modelfile):
        assert Path(modelfile).is_file()
        self.models.add(name)
        self.events.append(f"create:{name}")

    def list_models(self):
        return [f"{m}:latest" for m in self.models]

    def delete_model(self, name):
        self.models.discard(name)
        self.events.append(f"delete:{name}")

    def client(self):
        return SimpleNamespace(server=self)


class World:
    """Fake collaborators that write real (tiny) files, count calls and can be told to break."""

    def __init__(self, root: Path):
        self.root, self.calls, self.events = root, [], []
        self.train_code, self.gguf_problems, self.fuse_dtype = 0, [], "F32"
        self.ollama_binary: Path | None = root / "bin" / "ollama"
        self.server_fails, self.llamacpp = False, None
        self.gates_pass, self.eval_error, self.train_interrupt = True, None, False
        self.environ: dict[str, str] = {}
        self.train_args: list[list[str]] = []
        self.eval_inputs = []

    def resolve_model(self, spec):
        self.calls.append("resolve")
        path = self.root / "models" / spec
        path.mkdir(parents=True, exist_ok=True)
        (path / "config.json").write_text(json.dumps({"model_type": "llama"}))
        return SimpleNamespace(name=spec, path=path, source="built")

    def load_tokenizer(self, path):
        return SimpleNamespace(eos_token="<|im_end|>")

    def prepare_data(self, cfg, out, tokenizer):
        self.calls.append("prepare")
        return prepare_data(cfg, out, None)

    def train(self, args, log_path, log):
        self.calls.append("train")
        self.train_args.append(list(args))
        if self.train_interrupt:
            raise KeyboardInterrupt
        log_path.write_text("step 1 loss 4.0\nTraceback: boom\n" if self.train_code else "step 1 loss 4.0\n")
        if self.train_code:
            return self.train_code
        run = Path(args[args.index("--run-dir") + 1])
        cfg = Path(args[args.index("--config") + 1]).read_text()
        (run / "adapter").mkdir(parents=True, exist_ok=True)
        (run / "adapter" / "adapters.safetensors").write_text(cfg)  # content follows the config
        (run / "adapter" / "adapter_config.json").write_text("{}")
        shutil.copytree(run.parent / "data", run / "data", dirs_exist_ok=True)
        (run / "train_result.json").write_text(json.dumps({"steps": 3, "final_train_loss": 0.5}))
        return 0

    def fuse(self, base, adapter, out):
        self.calls.append("fuse")
        out.mkdir(parents=True, exist_ok=True)
        (out / "config.json").write_text("{}")
        dtype = np.float32 if self.fuse_dtype == "F32" else np.float16
        save_file({"w": np.ones((2, 2), dtype)}, str(out / "model.safetensors"))

    def export_gguf(self, hf, out, outtype):
        self.calls.append("gguf")
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_bytes(b"GGUF" + outtype.encode())

    def check_gguf(self, path, hf):
        return list(self.gguf_problems)

    def locate_ollama(self):
        if self.ollama_binary is None:
            return SimpleNamespace(binary=None, source="none", reason="no ollama on PATH")
        return SimpleNamespace(binary=self.ollama_binary, source="env", reason="fake")

    def ollama_server(self, binary, folder):
        self.calls.append("serve")
        return FakeServer(self.events, fail_start=self.server_fails)

    def deploy(self, server, name, gguf, text, folder):
        path = Path(folder) / "Modelfile"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        server.create_model(name, path)
        return DeployResult(name, path, [Check("create", True, "ok"), Check("listed", True, "ok")])

    def served_checks(self, client, name, prompt):
        self.calls.append("served_checks")
        return [Check("generate", True, f"answered {prompt!r}"), Check("stream_chunks", True, "ok")]

    def ollama_answers(self, client, name, prompts, max_tokens):
        assert name in client.server.models  # the model exists when evaluation asks it
        return ["ok"] * len(prompts)

    def evaluate(self, inputs, log):
        self.calls.append("evaluate")
        self.eval_inputs.append(inputs)
        if self.eval_error:
            raise self.eval_error
        if inputs.ollama is not None:
            inputs.ollama([], 8)
        verdicts = [Verdict(g, self.gates_pass, 1.0, 0.9, "fake") for g in GATES]
        return EvalOutcome([], {}, {"ollama": {"status": "passed", "reason": None}}, verdicts, {}, "ollama")

    def deps(self) -> PipelineDeps:
        return PipelineDeps(
            self.resolve_model, self.load_tokenizer, self.prepare_data, self.train, self.fuse, self.export_gguf,
            self.check_gguf, self.locate_ollama, self.ollama_server, self.deploy, self.served_checks,
            self.ollama_answers, lambda: self.llamacpp, self.evaluate, lambda: {"python": "fake"},
            environ=self.environ,
        )  # fmt: skip


@pytest.fixture
def world(tmp_path):
    return World(tmp_path)


def cfg(*sets):
    return load_config("release", overrides=["model.name=fake-model", "data.num_examples=40", *sets])


def run(world, *sets, run_dir=None):
    return run_pipeline(cfg(*sets), run_dir or world.root / "run", deps=world.deps(), log=lambda _: None)


def rerun(world, *sets):
    """Forget what the previous runs called, then run again in the same run folder."""
    world.calls.clear()
    world.events.clear()
    return run(world, *sets)


def statuses(result):
    return {s.name: (s.status, s.reason or "") for s in result.report.stages}


def test_a_healthy_run_passes_every_stage_in_order_and_cleans_up(world):
    result = run(world)
    rep = result.report
    assert result.exit_code == 0 and rep.status == "passed", [(s.name, s.reason) for s in rep.stages]
    assert [s.name for s in rep.stages] == NAMES and all(s.status == "passed" for s in rep.stages)
    assert world.calls == [
        "resolve",
        "prepare",
        "train",
        "fuse",
        "gguf",
        "serve",
        "served_checks",
        "evaluate",
    ]
    assert world.events == DEPLOY_CYCLE
    assert rep.ollama.deleted is True and rep.ollama.server_stopped is True
    assert [c.name for c in rep.ollama.served_checks] == ["generate", "stream_chunks"]
    assert [g.name for g in rep.gates] == list(GATES) and all(g.status == "passed" for g in rep.gates)
    assert validate_report(result.report_path.read_text()) == rep
    for name in NAMES:
        record = json.loads((world.root / "run" / "stages" / f"{name}.json").read_text())
        assert record["digest"] == digest_of(record["inputs"])
    gguf = next(s for s in rep.stages if s.name == "gguf")
    assert gguf.artifacts[0].bytes == len(b"GGUFf16") and len(gguf.artifacts[0].sha256) == 64
    assert "--config" in world.train_args[0] and "--resume" not in world.train_args[0]
    assert rep.environment == {"python": "fake"}


def test_a_second_run_skips_every_unchanged_stage(world):
    run(world)
    result = rerun(world)
    assert result.exit_code == 0
    assert all(
        s.status == "skipped" and s.cached and s.reason.startswith("cached") for s in result.report.stages
    )
    assert world.calls == [] and world.events == []  # no server started when nothing needs one
    assert all(g.status == "passed" for g in result.report.gates)  # the gates come from the cached evaluation


def test_changing_a_config_value_reruns_that_stage_and_everything_after(world):
    run(world)
    result = rerun(world, "training.learning_rate=1e-4")
    st = statuses(result)
    assert st["prepull"][0] == st["dataset"][0] == "skipped"
    assert all(st[n][0] == "passed" for n in ("train", "fuse", "gguf", "ollama", "evaluate"))
    assert world.calls == ["train", "fuse", "gguf", "serve", "served_checks", "evaluate"]
    result = rerun(world, "training.learning_rate=1e-4", "export.gguf_type=q8_0")
    assert world.calls == ["gguf", "serve", "served_checks", "evaluate"]


def test_a_missing_artifact_reruns_its_stage_and_identical_output_keeps_the_rest_cached(world):
    run(world)
    (world.root / "run" / "gguf" / "model-f16.gguf").unlink()
    result = rerun(world)
    assert result.exit_code == 0 and world.calls == ["gguf"]  # same bytes again: downstream stays cached
    assert statuses(result)["gguf"][0] == "passed" and statuses(result)["evaluate"][0] == "skipped"


def test_a_failed_stage_marks_later_stages_skipped_and_the_rerun_resumes_there(world):
    world.gguf_problems = ["model-f16.gguf: tokenizer.ggml.token_type is an array of UINT32"]
    result = run(world)
    st = statuses(result)
    assert result.exit_code == 1 and result.report.status == "failed"
    assert st["gguf"][0] == "failed" and "UINT32" in st["gguf"][1]
    assert st["ollama"] == ("skipped", "gguf failed") and st["evaluate"] == ("skipped", "gguf failed")
    assert all(g.status == "skipped" for g in result.report.gates)
    assert not (world.root / "run" / "stages" / "gguf.json").exists()
    assert world.events == []
    world.gguf_problems, world.calls = [], []
    result = run(world)
    assert result.exit_code == 0
    assert world.calls == ["gguf", "serve", "served_checks", "evaluate"]


def test_a_failing_trainer_fails_the_train_stage_with_its_log(world):
    world.train_code = 2
    result = run(world)
    st = statuses(result)
    assert (
        st["train"][0] == "failed"
        and "exited with code 2" in st["train"][1]
        and "Traceback: boom" in st["train"][1]
    )
    assert result.exit_code == 1


def test_training_resumes_when_its_inputs_are_unchanged_and_a_checkpoint_exists(world):
    run(world)
    run_dir = world.root / "run"
    (run_dir / "stages" / "train.json").unlink()  # as if training had crashed before recording
    (run_dir / "train" / "checkpoints" / "0000010").mkdir(parents=True)
    run(world)
    assert "--resume" in world.train_args[-1]
    run(world, "training.iters=5")  # other inputs: start over, never resume a foreign checkpoint
    assert "--resume" not in world.train_args[-1]
    assert not (run_dir / "train" / "checkpoints" / "0000010").exists()


def test_a_fuse_that_is_not_full_precision_fails(world):
    world.fuse_dtype = "F16"
    st = statuses(run(world))
    assert st["fuse"][0] == "failed" and "not all float32" in st["fuse"][1]


def test_no_ollama_binary_skips_ollama_and_evaluates_on_llamacpp(world):
    world.ollama_binary = None
    result = run(world)
    st = statuses(result)
    assert result.exit_code == 0
    assert st["ollama"][0] == "skipped" and "no ollama on PATH" in st["ollama"][1]
    assert result.report.ollama.status == "skipped" and result.report.ollama.deleted is None
    assert world.eval_inputs[-1].ollama is None and world.eval_inputs[-1].llamacpp_reason is None
    assert not (world.root / "run" / "stages" / "ollama.json").exists()  # re-decided on the next run


def test_an_ollama_that_cannot_start_is_skipped_with_the_reason(world):
    world.server_fails = True
    result = run(world)
    st = statuses(result)
    assert result.exit_code == 0 and st["ollama"][0] == "skipped" and "libsycl" in st["ollama"][1]


def test_neither_runtime_fails_loudly_unless_allowed(world):
    world.ollama_binary, world.llamacpp = None, "xllamacpp is not installed"
    result = run(world)
    st = statuses(result)
    assert result.exit_code == 1 and st["evaluate"][0] == "failed"
    assert "no runtime can serve the GGUF" in st["evaluate"][1] and "FT_ALLOW_NO_RUNTIME" in st["evaluate"][1]
    world.environ["FT_ALLOW_NO_RUNTIME"] = "1"
    result = run(world)
    ev = next(s for s in result.report.stages if s.name == "evaluate")
    assert result.exit_code == 0 and "allowed by FT_ALLOW_NO_RUNTIME=1" in ev.details["no_runtime"]


def test_failed_gates_fail_the_run_and_are_not_cached(world):
    world.gates_pass = False
    result = run(world)
    assert result.exit_code == 1 and statuses(result)["evaluate"][0] == "failed"
    assert all(g.status == "failed" for g in result.report.gates)
    assert not (world.root / "run" / "stages" / "evaluate.json").exists()
    assert result.report.ollama.deleted is True and world.events[-1] == "stop"


def test_the_server_is_stopped_and_the_model_deleted_when_evaluation_crashes(world):
    world.eval_error = RuntimeError("segfault in a runtime")
    result = run(world)
    assert statuses(result)["evaluate"] == ("failed", "RuntimeError: segfault in a runtime")
    assert world.events == DEPLOY_CYCLE


def test_evaluation_recreates_the_model_when_the_deploy_stage_was_cached(world):
    run(world)
    (world.root / "run" / "stages" / "evaluate.json").unlink()
    result = rerun(world)
    assert statuses(result)["ollama"][0] == "skipped" and result.exit_code == 0
    assert world.events == DEPLOY_CYCLE


def test_ctrl_c_writes_the_report_and_stops_everything(world):
    world.train_interrupt = True
    with pytest.raises(KeyboardInterrupt):
        run(world)
    rep = validate_report((world.root / "run" / "report.json").read_text())
    assert rep.exit_code == 130 and {s.name: s.status for s in rep.stages}["train"] == "skipped"
    assert world.events == []


def test_pipeline_main_exit_codes(world, tmp_path):
    out = io.StringIO()
    code = pipeline_main("release", None, ["model.name=fake-model", "data.num_examples=40"], tmp_path / "r", out,
                         deps=world.deps())  # fmt: skip
    assert (
        code == 0
        and "pipeline PASSED" in out.getvalue()
        and str(tmp_path / "r" / "report.json") in out.getvalue()
    )
    with contextlib.redirect_stderr(io.StringIO()) as err:
        assert (
            pipeline_main(
                "release", None, ["training.iters=0"], tmp_path / "bad", io.StringIO(), deps=world.deps()
            )
            == 2
        )
    assert "training.iters" in err.getvalue()
    world.gguf_problems = ["broken"]
    assert pipeline_main("release", None, ["model.name=fake-model", "data.num_examples=40"], tmp_path / "f",
                         io.StringIO(), deps=world.deps()) == 1  # fmt: skip


def test_a_data_template_ollama_cannot_reproduce_is_bad_input(world):
    world.load_tokenizer = lambda path: SimpleNamespace(eos_token="</s>")  # no chat template at all
    result = run(world, "data.template=tokenizer", run_dir=world.root / "r2")
    # the dataset stage already refuses a tokenizer without a chat template: exit 2, not 1
    assert result.exit_code == 2 and statuses(result)["dataset"][0] == "failed"


# ---------------------------------------------------------------- chat_for_deploy


SMOL_TEMPLATE = (
    "{% for m in messages %}{% if loop.first and m['role'] != 'system' %}<|im_start|>system\nYou are SmolLM."
    "<|im_end|>\n{% endif %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def test_chat_for_deploy_named_formats_and_overrides(toy_tokenizer):
    template, stops, system = chat_for_deploy(cfg(), toy_tokenizer)
    assert (template, stops, system) == (chat_format("chatml").template, ["<|im_end|>", "<|im_start|>"], None)
    _, stops, system = chat_for_deploy(cfg("deploy.stop=[END]", "deploy.system=Be brief."), toy_tokenizer)
    assert stops == ["END"] and system == "Be brief."
    with pytest.raises(ModelfileError, match="deploy.stop"):
        chat_for_deploy(cfg("deploy.template='{{ .Prompt }}'"), toy_tokenizer)


def test_chat_for_deploy_reproduces_a_tokenizer_template_with_a_default_system_prompt(toy_tokenizer):
    plain = chat_for_deploy(cfg("data.template=tokenizer"), toy_tokenizer)  # conftest's template is ChatML
    assert plain[0] == chat_format("chatml").template and plain[2] is None
    toy_tokenizer.chat_template, saved = SMOL_TEMPLATE, toy_tokenizer.chat_template
    try:
        template, stops, system = chat_for_deploy(cfg("data.template=tokenizer"), toy_tokenizer)
        assert system == "You are SmolLM." and stops[0] == "<|im_end|>"
        with pytest.raises(ModelfileError, match="differs"):
            chat_for_deploy(cfg("data.template=tokenizer", "deploy.system=Other."), toy_tokenizer)
        toy_tokenizer.chat_template = "{% for m in messages %}### {{ m['content'] }}\n{% endfor %}"
        with pytest.raises(ModelfileError, match="no Ollama template"):
            chat_for_deploy(cfg("data.template=tokenizer"), toy_tokenizer)
    finally:
        toy_tokenizer.chat_template = saved


def test_safetensors_dtypes_reads_headers(tmp_path):
    save_file({"a": np.ones(2, np.float32), "b": np.ones(2, np.float16)}, str(tmp_path / "m.safetensors"))
    assert safetensors_dtypes(tmp_path) == {"F32": 1, "F16": 1}
