"""The pipeline tier with fakes: order, digest skips, failure recording, degradation, allowances, cleanup."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from safetensors.numpy import save_file

from finetune.config.loader import load_config
from finetune.evaluate.evaluation import EvalSettings
from finetune.evaluate.prompts import EvalPrompt
from finetune.gates.parity import Answer
from finetune.gates.runtime_parity import RuntimeMeasurements
from finetune.recipes.commands import COMMANDS, RECIPES
from finetune.report.models import validate_report
from finetune.serve.deploy import Check, DeployResult
from finetune.serve.modelfile import chat_format
from finetune.stages.rundir import own_config
from finetune.system.hashing import json_sha256
from tests.fakes import FakeTrainer, fake_deps

NAMES = ["model", "data", "train", "judge", "fuse", "gguf", "ollama", "evaluate"]
# The server events of one evaluation: the model is created, then deleted before the server stops.
DEPLOY_CYCLE = ["start", "create:finetune-release", "delete:finetune-release", "stop"]


class FakeServer:
    def __init__(self, events, *, fail_start=False, template=None):
        self.events, self.fail_start, self.template = events, fail_start, template
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
        text = Path(modelfile).read_text()
        self.template = text.split('TEMPLATE """', 1)[1].split('"""', 1)[0]
        # what `ollama show` lists: one "name value" line per PARAMETER, strings quoted
        self.parameters = [
            line.removeprefix("PARAMETER ") for line in text.splitlines() if line.startswith("PARAMETER")
        ]

    def show(self, name):
        return {"template": self.template, "parameters": "\n".join(self.parameters)}

    def list_models(self):
        return [f"{m}:latest" for m in self.models]

    def delete_model(self, name):
        self.models.discard(name)
        self.events.append(f"delete:{name}")

    def client(self):
        return SimpleNamespace(server=self)


class World:
    """Fake shipping collaborators that write real (tiny) files, count calls and can be told to break."""

    def __init__(self, root: Path, tokenizer):
        self.root, self.tokenizer, self.calls, self.events = root, tokenizer, [], []
        self.gguf_problems, self.fuse_dtype = [], "F32"
        self.ollama_binary: Path | None = root / "bin" / "ollama"
        self.server_fails, self.llamacpp = False, None
        self.answers_right, self.eval_error, self.runner_crashes = True, None, False
        self.fused_config_changes: dict = {}
        self.environ: dict[str, str] = {}
        self.eval_inputs = []

    def fuse(self, base, adapter, out, dtype=None):
        self.calls.append("fuse")
        out.mkdir(parents=True, exist_ok=True)
        config = json.loads((Path(base) / "config.json").read_text()) | {"torch_dtype": "float32"}
        (out / "config.json").write_text(json.dumps(config | self.fused_config_changes))
        dtype = np.float32 if self.fuse_dtype == "F32" else np.float16
        save_file({"w": np.ones((2, 2), dtype)}, str(out / "model.safetensors"))

    def measure_fuse(self, base, adapter, out):
        from finetune.gates.fuse import FuseMeasurement

        return FuseMeasurement(
            {"model.layers.1.self_attn.q_proj": 1e-7}, {"model.layers.1.self_attn.q_proj": 0.01}, [], [], 5
        )

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
        return [Check("stream_matches", True, "ok"), Check("concurrent", True, "identical")]

    def ollama_answers(self, server, name, prompts):
        assert name in server.models  # the model exists when evaluation asks it
        if self.runner_crashes:
            raise RuntimeError("llama runner process has terminated: signal: killed (status code: 500)")
        return [Answer(p.reference, "stop", None, None, p.prompt) for p in prompts]

    def openai_answers(self, server, name, messages):
        first = {"text": "answer0", "finish": "stop", "rendered": "p0"}
        return {"defaults": [first] * 3, "greedy": first}

    def evaluate(self, inputs, log):
        self.calls.append("evaluate")
        self.eval_inputs.append(inputs)
        if self.eval_error:
            raise self.eval_error
        prompts = [EvalPrompt("train", f"q{i}", f"p{i}", f"answer{i}") for i in range(4)]
        prompts += [EvalPrompt("heldout", "q4", "p4", "answer0", paraphrase=True)]  # a trained fact rephrased
        right = [
            Answer(p.reference if self.answers_right else "no idea", "stop", [1, 2, 0], 5) for p in prompts
        ]
        m = RuntimeMeasurements(
            prompts=prompts, gguf_type=inputs.gguf_type, stops=["<|im_end|>"], end_ids=[0]
        )
        m.answers = {
            "mlx_base": [Answer("no idea", "stop", [9, 0], 5)] * 5,
            "mlx_adapter": right,
            "mlx_fused": right,
        }
        m.runtimes = {k: {"status": "passed"} for k in m.answers}
        if inputs.llamacpp_reason is None:
            m.answers["llamacpp"], m.runtimes["llamacpp"] = right, {"status": "passed"}
            m.tokenizer_texts, m.hf_ids, m.gguf_ids = ["a"], [[1]], [[1]]
            ref = np.log(np.full((3, 4), 0.25))
            m.logprob_reference, m.logprob_candidate = ref, [{0: float(ref[i, 0])} for i in range(3)]
        else:
            m.runtimes["llamacpp"] = {"status": "skipped", "reason": inputs.llamacpp_reason}
        if inputs.ollama is not None:
            try:
                m.answers["ollama"], m.runtimes["ollama"] = inputs.ollama(prompts), {"status": "passed"}
                m.training_prompt_ids = [[ord(c) for c in p.prompt] for p in prompts]
                m.served_prompt_ids = [[ord(c) for c in a.rendered] for a in m.answers["ollama"]]
            except RuntimeError as exc:  # like evaluation._timed: one runtime failing is a gate failure
                m.runtimes["ollama"] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
        else:
            m.runtimes["ollama"] = {"status": "skipped", "reason": inputs.ollama_reason}
        return m

    def deps(self, trainer=None):
        d = fake_deps(self.tokenizer, self.root / "models", trainer)
        return replace(d, fuse=self.fuse, measure_fuse=self.measure_fuse, export_gguf=self.export_gguf,
                       check_gguf=self.check_gguf, locate_ollama=self.locate_ollama, ollama_server=self.ollama_server,
                       deploy=self.deploy, served_checks=self.served_checks, ollama_answers=self.ollama_answers,
                       openai_answers=self.openai_answers,
                       llamacpp_reason=lambda: self.llamacpp, evaluate=self.evaluate, environ=self.environ)  # fmt: skip


@pytest.fixture
def world(tmp_path, toy_tokenizer):
    return World(tmp_path, toy_tokenizer)


def run(world, *sets, run_dir=None, trainer=None):
    run_dir = run_dir or world.root / "run"
    cfg = load_config("release", overrides=["data.num_examples=40", *sets])
    if (run_dir / "config.yaml").exists() and sets:
        (run_dir / "config.yaml").unlink()  # these tests change inputs on purpose
    own_config(run_dir, cfg)
    return RECIPES["pipeline"](cfg, run_dir, world.deps(trainer), log=lambda _: None, settings=EvalSettings())


def rerun(world, *sets):
    world.calls.clear()
    world.events.clear()
    return run(world, *sets)


def statuses(result):
    return {s.name: (s.status, s.reason or "") for s in result.report.stages}


def gates(result):
    return {g.name: g.status for g in result.report.gates}


def test_a_healthy_run_passes_every_stage_and_gate_in_order_and_cleans_up(world):
    result = run(world)
    rep = result.report
    assert result.exit_code == 0 and rep.status == "passed", rep.reasons
    assert [s.name for s in rep.stages] == NAMES and all(s.status == "passed" for s in rep.stages)
    assert world.calls == ["fuse", "gguf", "serve", "served_checks", "evaluate"]
    assert world.events == DEPLOY_CYCLE
    assert rep.ollama.deleted is True and rep.ollama.server_stopped is True
    assert set(gates(result)) == set(COMMANDS["pipeline"].gates)
    assert set(gates(result).values()) == {"passed"}
    assert (
        validate_report(result.report_path.read_text()).model_dump() == rep.model_dump()
    )  # what report.json says
    for name in NAMES:
        record = json.loads((world.root / "run" / "stages" / f"{name}.json").read_text())
        assert record["digest"] == json_sha256(record["inputs"]) and record["inputs"]["code"].startswith(
            "0.2.0+"
        )
    gguf = next(s for s in rep.stages if s.name == "gguf")
    assert gguf.artifacts[0].bytes == len(b"GGUFf16") and len(gguf.artifacts[0].sha256) == 64


def test_a_second_run_reuses_every_unchanged_stage_and_its_verdicts(world):
    run(world)
    result = rerun(world)
    assert result.exit_code == 0
    assert all(s.cached and s.reason.startswith("cached") for s in result.report.stages)
    assert world.calls == [] and world.events == []  # no server started when nothing needs one
    assert set(gates(result).values()) == {"passed"}, "the gates come back from the cached stage records"


def test_a_code_change_invalidates_cached_stages(world, monkeypatch):
    run(world)
    from finetune.stages import keys

    monkeypatch.setattr(keys, "code_version", lambda: "0.2.0+another-source")
    rerun(world)
    assert world.calls == ["fuse", "gguf", "serve", "served_checks", "evaluate"]


def test_changing_a_config_value_reruns_that_stage_and_everything_after(world):
    run(world)
    rerun(world, "export.gguf_type=q8_0")
    assert world.calls == ["gguf", "serve", "served_checks", "evaluate"]


def test_a_failed_stage_skips_later_stages_and_their_gates_and_the_rerun_resumes_there(world):
    world.gguf_problems = ["model-f16.gguf: tokenizer.ggml.token_type is an array of UINT32"]
    result = run(world)
    st = statuses(result)
    assert result.exit_code == 1 and result.report.status == "failed"
    assert st["gguf"][0] == "failed" and "UINT32" in st["gguf"][1]
    assert st["ollama"] == ("skipped", "gguf failed") and st["evaluate"] == ("skipped", "gguf failed")
    assert gates(result)["output_parity"] == "skipped"
    assert not (world.root / "run" / "stages" / "gguf.json").exists()
    world.gguf_problems, world.calls = [], []
    assert run(world).exit_code == 0 and world.calls == ["gguf", "serve", "served_checks", "evaluate"]


def test_a_fuse_that_is_not_full_precision_fails(world):
    world.fuse_dtype = "F16"
    st = statuses(run(world))
    assert st["fuse"][0] == "failed" and "not all float32" in st["fuse"][1]


def test_no_ollama_is_degraded_not_passed_unless_the_skip_is_allowed(world):
    world.ollama_binary = None
    result = run(world)
    st = statuses(result)
    assert result.exit_code == 3 and result.report.status == "degraded"
    assert st["ollama"][0] == "skipped" and "no ollama on PATH" in st["ollama"][1]
    assert any("ollama" in r for r in result.report.reasons)
    assert gates(result)["served_answers"] == "skipped"
    assert not (world.root / "run" / "stages" / "ollama.json").exists()  # decided again on the next run
    world.environ["FT_ALLOW_SKIP"] = "ollama"
    result = rerun(world)
    assert result.exit_code == 0 and result.report.status == "passed"
    assert any("ollama" in a for a in result.report.allowed_skips), "the report records the allowance"


def test_an_ollama_that_cannot_start_is_skipped_with_the_reason(world):
    world.server_fails = True
    result = run(world)
    assert result.exit_code == 3 and "libsycl" in statuses(result)["ollama"][1]


def test_wrong_answers_fail_the_runtime_gates(world):
    world.answers_right = False
    result = run(world)
    assert result.exit_code == 1 and gates(result)["adapter_effect"] == "failed"


def test_a_served_template_unlike_training_fails_served_template(world, plant_fault):
    plant_fault("modelfile_wrong_template")
    result = run(world)
    assert gates(result)["served_template"] == "failed" and result.report.faults == [
        "modelfile_wrong_template"
    ]


def test_the_server_is_stopped_and_the_model_deleted_when_evaluation_crashes(world):
    world.eval_error = RuntimeError("segfault in a runtime")
    result = run(world)
    assert statuses(result)["evaluate"] == ("failed", "RuntimeError: segfault in a runtime")
    assert world.events == DEPLOY_CYCLE


def test_evaluation_recreates_the_model_when_the_deploy_stage_was_cached(world):
    run(world)
    (world.root / "run" / "stages" / "evaluate.json").unlink()
    result = rerun(world)
    assert statuses(result)["ollama"][0] == "passed" and result.exit_code == 0
    assert world.events == DEPLOY_CYCLE


def test_an_interrupt_writes_the_report_with_the_resume_command_and_stops_everything(world):
    result = run(world, trainer=FakeTrainer(interrupt_at=3))
    rep = validate_report((world.root / "run" / "report.json").read_text())
    assert result.exit_code == 130 and rep.status == "interrupted"
    assert rep.resume_command == f"finetune pipeline --run-dir {world.root / 'run'} --resume"
    assert statuses(result)["train"] == ("failed", "interrupted by SIGINT")
    assert world.events == []


def test_the_chat_template_for_ollama_comes_from_the_data_template(world):
    run(world)
    modelfile = (world.root / "run" / "ollama" / "Modelfile").read_text()
    assert chat_format("chatml").template in modelfile and 'PARAMETER stop "<|im_end|>"' in modelfile
