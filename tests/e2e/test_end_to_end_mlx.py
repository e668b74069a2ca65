"""Tier 3: the release pipeline on a real model, HF -> LoRA -> fuse -> GGUF -> Ollama -> evaluation -> report.

Runs by default (`make test-e2e-mlx`); model: FT_E2E_MODEL_ID, default smollm2-135m, profile configs/release.yaml.
It skips, with the reason printed and written to artifacts/tier3-last.json, only when the model or the memory
is missing. Ollama stages may be skipped only when no Ollama binary exists here. Takes ~6-8 minutes on a
shared 2-core CPU (the budget is 15).
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
from datetime import UTC, datetime
from pathlib import Path

import pytest

from finetune.atomic import atomic_write_json
from tests.conftest import SERVED_CHECK_NAMES

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("FT_ARTIFACTS", ROOT / "artifacts"))
MODEL = os.environ.get("FT_E2E_MODEL_ID", "smollm2-135m")
BUDGET_S = 15 * 60
STAGES = ("prepull", "dataset", "train", "fuse", "gguf", "ollama", "evaluate")
GATES = ("output_parity", "adapter_effect", "clean_endings", "tokenizer_parity", "logprob_parity")

pytestmark = pytest.mark.e2e_mlx


def _last(payload: dict) -> None:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(
        ARTIFACTS / "tier3-last.json",
        {"tier": 3, "model": MODEL, "at": datetime.now(UTC).isoformat(), **payload},
    )


def _skip(reason: str):
    _last({"status": "skipped", "reason": reason})
    print(f"tier 3 SKIPPED: {reason}")
    pytest.skip(reason)


class _Progress(io.StringIO):
    """Keeps the pipeline's output and shows its stage lines live (an 8-minute test should not look hung);
    the trainer's step lines ("  | ...") stay in the captured output only."""

    def __init__(self, capman):
        super().__init__()
        self.capman, self.partial = capman, ""

    def show(self, text: str) -> None:
        ctx = self.capman.global_and_fixture_disabled() if self.capman else contextlib.nullcontext()
        with ctx:
            sys.stdout.write(text)
            sys.stdout.flush()

    def write(self, s: str) -> int:
        super().write(s)
        *lines, self.partial = (self.partial + s).split("\n")
        shown = [ln for ln in lines if not ln.startswith("  | ")]
        if shown:
            self.show("".join(f"{ln}\n" for ln in shown))
        return len(s)


@pytest.fixture(scope="module")
def tier3(request):
    from finetune.models import ModelUnavailable, resolve_model
    from finetune.ollama_provision import locate_ollama
    from finetune.pipeline import pipeline_main
    from finetune.report import REPORT_NAME, validate_report
    from finetune.resources import available_memory_bytes, choose_for_memory

    choice = choose_for_memory(available_memory_bytes())
    if choice.model_spec is None:
        _skip(choice.reason)
    try:
        resolve_model(MODEL)  # the pipeline's pre-pull stage finds it cached
    except ModelUnavailable as exc:
        _skip(f"model {MODEL!r} unavailable: {exc}")
    run_dir = ARTIFACTS / f"tier3-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    sets = [f"model.name={MODEL}", f"training.batch_size={choice.batch_size}"]
    out = _Progress(request.config.pluginmanager.getplugin("capturemanager"))
    code = pipeline_main("release", None, sets, run_dir, out)
    report_path = run_dir / REPORT_NAME
    assert report_path.is_file(), f"no report at {report_path}; output:\n{out.getvalue()[-3000:]}"
    report = validate_report(report_path.read_text())
    _last({"status": report.status, "exit_code": code, "run_dir": str(run_dir), "report": str(report_path),
           "seconds": report.seconds})  # fmt: skip
    out.show(f"tier 3 {report.status} (exit {code}) in {report.seconds:.0f} s; report: {report_path}\n")
    return {"code": code, "report": report, "ollama_binary": locate_ollama().binary, "path": report_path}


def test_report_validates_against_the_committed_schema(tier3):
    import json

    from finetune.report import SCHEMA_PATH, schema_text

    assert SCHEMA_PATH.read_text() == schema_text()
    rep = tier3["report"]
    assert [s.name for s in rep.stages] == list(STAGES)
    assert json.loads(tier3["path"].read_text())["schema_version"] == 1
    assert rep.environment.get("blas") and rep.environment.get("packages"), (
        "doctor.collect() is in the report"
    )


@pytest.mark.parametrize("stage", STAGES)
def test_stage(tier3, stage):
    entry = next(s for s in tier3["report"].stages if s.name == stage)
    if stage == "ollama" and tier3["ollama_binary"] is None:
        assert entry.status == "skipped" and entry.reason, "Ollama missing: the stage must say why it skipped"
        return
    assert entry.status == "passed", f"{stage}: {entry.status}: {entry.reason}"
    if stage in ("prepull", "dataset", "train", "fuse", "gguf", "evaluate"):
        assert entry.artifacts and all(len(a.sha256) == 64 and a.bytes > 0 for a in entry.artifacts)


@pytest.mark.parametrize("gate", GATES)
def test_gate(tier3, gate):
    g = next((g for g in tier3["report"].gates if g.name == gate), None)
    assert g is not None, f"gate {gate} missing from the report"
    if g.status == "skipped" and os.environ.get("FT_ALLOW_NO_RUNTIME") == "1":
        pytest.skip(f"{gate}: {g.detail} (FT_ALLOW_NO_RUNTIME=1)")
    assert g.status == "passed", f"{gate}: {g.detail}"


def test_served_model_checks_and_cleanup(tier3):
    o = tier3["report"].ollama
    if tier3["ollama_binary"] is None:
        pytest.skip(f"no Ollama binary: {o.reason}")
    assert o.deploy_checks and all(c.passed for c in o.deploy_checks), o.deploy_checks
    names = {c.name for c in o.served_checks}
    assert set(SERVED_CHECK_NAMES) <= names
    assert all(c.passed for c in o.served_checks), o.served_checks
    assert o.deleted is True and o.server_stopped is True


def test_fine_tuned_model_beats_the_base_and_the_run_fits_the_budget(tier3):
    rep = tier3["report"]
    scores = {s.runtime: s for s in rep.scores}
    served = "ollama" if "ollama" in scores else "llamacpp"
    assert scores[served].train.score > scores["mlx_base"].train.score
    assert rep.seconds < BUDGET_S, f"tier 3 took {rep.seconds:.0f} s (budget {BUDGET_S} s)"
    assert tier3["code"] == 0 and rep.status == "passed"
