"""Running stages: digests with the code version, cached records with their verdicts, failures, signals."""

from __future__ import annotations

import hashlib
import json
import signal
from pathlib import Path

import pytest

from finetune.config.loader import load_config
from finetune.gates.verdict import verdict
from finetune.report.artifacts import artifact
from finetune.report.models import StageReport
from finetune.stages.context import Ctx, Stage, StageError
from finetune.stages.keys import code_version
from finetune.stages.runner import Run, record_path
from finetune.system.signals import Interrupted
from tests.fakes import fake_deps


def ctx(tmp_path, toy_tokenizer, log=lambda _: None, **kw) -> Ctx:
    return Ctx(
        load_config("quick"), tmp_path, fake_deps(toy_tokenizer, tmp_path / "m"), log, "t", ("g",), **kw
    )


def run_stages(c: Ctx, stages):
    """(reports, some stage failed on bad input, the signal that stopped the run)"""
    r = Run(c)
    for stage in stages:
        r.stage(stage)
    return r.reports, r.bad_input, r.stop


def test_a_passed_stage_is_recorded_with_its_verdicts_and_reused_until_its_inputs_change(
    tmp_path, toy_tokenizer
):
    calls, seed = [], {"v": 1}

    def body(c):
        calls.append(1)
        return StageReport(outputs={"x": seed["v"]}, verdicts=[verdict("g", True, 1.0, 0.5, "ok")])

    stage = Stage("s", body, lambda c: {"seed": seed["v"]})
    reports, bad, stop = run_stages(ctx(tmp_path, toy_tokenizer), [stage])
    assert [r.status for r in reports] == ["passed"] and not bad and stop is None
    record = json.loads(record_path(tmp_path, "s").read_text())
    assert record["inputs"]["code"] == code_version() and record["verdicts"][0]["name"] == "g"
    c2 = ctx(tmp_path, toy_tokenizer)
    reports, _, _ = run_stages(c2, [stage])
    assert reports[0].cached and len(calls) == 1 and [v.name for v in c2.verdicts] == ["g"]
    seed["v"] = 2
    reports, _, _ = run_stages(ctx(tmp_path, toy_tokenizer), [stage])
    assert not reports[0].cached and len(calls) == 2


def test_a_failure_skips_the_rest_and_bad_input_is_flagged(tmp_path, toy_tokenizer):
    from finetune.data.sources import DatasetError

    def broken(c):
        raise DatasetError("data.jsonl:3: no usable rows")

    stages = [Stage("a", broken, lambda c: {}), Stage("b", lambda c: StageReport(), lambda c: {})]
    reports, bad, _ = run_stages(ctx(tmp_path, toy_tokenizer), stages)
    assert [(r.status, r.reason) for r in reports] == [("failed", "DatasetError: data.jsonl:3: no usable rows"),
                                                        ("skipped", "a failed")] and bad  # fmt: skip
    assert not record_path(tmp_path, "a").exists()


def test_a_stage_error_keeps_its_details(tmp_path, toy_tokenizer):
    def fails(c):
        raise StageError("checks failed", {"checks": [1, 2]})

    reports, bad, _ = run_stages(ctx(tmp_path, toy_tokenizer), [Stage("a", fails, lambda c: {})])
    assert reports[0].details == {"checks": [1, 2]} and not bad


@pytest.mark.parametrize(
    "exc,name", [(Interrupted(signal.SIGTERM), "SIGTERM"), (KeyboardInterrupt(), "SIGINT")]
)
def test_a_signal_stops_the_run_and_marks_what_did_not_run(tmp_path, toy_tokenizer, exc, name):
    def stopped(c):
        raise exc

    stages = [Stage("a", lambda c: StageReport(), lambda c: {}), Stage("b", stopped, lambda c: {}),
              Stage("c", lambda c: StageReport(), lambda c: {})]  # fmt: skip
    reports, _, stop = run_stages(ctx(tmp_path, toy_tokenizer), stages)
    assert stop.name == name
    assert [(r.name, r.status) for r in reports] == [("a", "passed"), ("b", "failed"), ("c", "skipped")]
    assert Path(record_path(tmp_path, "a")).exists() and not record_path(tmp_path, "b").exists()


def test_an_artifact_changed_under_the_run_is_named_and_that_stage_and_all_later_ones_rerun(
    tmp_path, toy_tokenizer
):
    calls, lines = [], []

    def writes(c):
        calls.append("a")
        (c.run_dir / "out" / "w.bin").parent.mkdir(exist_ok=True)
        (c.run_dir / "out" / "w.bin").write_bytes(b"made")
        return StageReport(artifacts=[artifact("out", c.run_dir / "out")])

    def judges(c):
        calls.append("b")
        return StageReport(verdicts=[verdict("g", True, 1.0, 0.5, "ok")])

    # b's own key does not hold a's artifacts: only the runner's rule reruns it
    stages = [Stage("a", writes, lambda c: {}), Stage("b", judges, lambda c: {})]
    run_stages(ctx(tmp_path, toy_tokenizer), stages)
    record = json.loads(record_path(tmp_path, "a").read_text())
    assert record["files"] == {"out": {"w.bin": hashlib.sha256(b"made").hexdigest()}}
    (tmp_path / "out" / "w.bin").write_bytes(b"fake")  # same size
    reports, _, _ = run_stages(ctx(tmp_path, toy_tokenizer, log=lines.append), stages)
    assert calls == ["a", "b", "a", "b"] and not any(r.cached for r in reports)
    assert lines[0] == (f"[a] out/w.bin changed since it was recorded (sha256 {hashlib.sha256(b'made').hexdigest()[:12]}… "
                        f"→ {hashlib.sha256(b'fake').hexdigest()[:12]}…): rerunning from a")  # fmt: skip
    assert "[b] rerunning: a's artifacts changed under the run" in lines
    reports, _, _ = run_stages(ctx(tmp_path, toy_tokenizer), stages)
    assert all(r.cached for r in reports) and calls == ["a", "b", "a", "b"]


def test_a_stage_rerun_for_new_inputs_says_which(tmp_path, toy_tokenizer):
    seed, lines = {"v": 1}, []
    stage = Stage("s", lambda c: StageReport(), lambda c: {"seed": seed["v"]})
    run_stages(ctx(tmp_path, toy_tokenizer), [stage])
    seed["v"] = 2
    run_stages(ctx(tmp_path, toy_tokenizer, log=lines.append), [stage])
    assert lines[0] == "[s] rerunning: inputs changed: seed"
