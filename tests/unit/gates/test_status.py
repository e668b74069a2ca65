"""A run's status: passed only when every required stage and gate ran and passed; skips degrade unless allowed."""

from __future__ import annotations

import signal

import pytest

from finetune.gates.status import ALLOW_ENV, EXIT, Outcome, allowed_skips, decide
from finetune.gates.verdict import skipped, verdict

REQUIRED = ("loss_convergence", "served_api", "gguf_tokenizer")
GATE_STAGES = {"served_api": "ollama", "gguf_tokenizer": "llamacpp"}


def stage(name, status="passed", reason=None, **kw):
    return {"name": name, "status": status, "reason": reason, **kw}


STAGES = [stage("train"), stage("ollama"), stage("evaluate")]


def passed(*names):
    return [verdict(n, True, 1.0, 1.0, "ok") for n in names]


def run(stages=STAGES, verdicts=None, *, allowed=frozenset(), **kw) -> Outcome:
    verdicts = passed(*REQUIRED) if verdicts is None else verdicts
    return decide(
        stages, verdicts, required_gates=REQUIRED, allowed=set(allowed), gate_stages=GATE_STAGES, **kw
    )


def test_everything_ran_and_passed():
    out = run()
    assert (out.status, out.exit_code, out.reasons, out.allowed) == ("passed", 0, [], [])


def test_a_failed_gate_fails_the_run():
    out = run(
        verdicts=[
            *passed("loss_convergence", "gguf_tokenizer"),
            verdict("served_api", False, 0.5, 1.0, "concurrent differ"),
        ]
    )
    assert (out.status, out.exit_code) == ("failed", 1)
    assert out.reasons == ["gate served_api failed: concurrent differ"]


def test_a_failed_stage_fails_the_run():
    out = run([stage("train"), stage("ollama", "failed", "create failed"), stage("evaluate")])
    assert out.status == "failed" and out.reasons == ["stage ollama failed: create failed"]


def test_a_skipped_required_gate_degrades_the_run():
    verdicts = [*passed("loss_convergence", "gguf_tokenizer"), skipped("served_api", "no Ollama binary")]
    out = run(verdicts=verdicts)
    assert (out.status, out.exit_code) == ("degraded", 3)
    assert out.reasons == ["gate served_api skipped: no Ollama binary"]


def test_a_required_gate_never_judged_degrades_the_run():
    out = run(verdicts=passed("loss_convergence", "served_api"))
    assert out.status == "degraded" and out.reasons == ["gate gguf_tokenizer was not judged"]


def test_a_skipped_required_stage_degrades_the_run():
    out = run([stage("train"), stage("ollama", "skipped", "no Ollama binary"), stage("evaluate")])
    assert out.status == "degraded" and out.reasons == ["stage ollama skipped: no Ollama binary"]


def test_skips_of_optional_or_cached_stages_do_not_degrade():
    stages = [
        stage("train"),
        stage("ollama", "skipped", "x", required=False),
        stage("evaluate", "skipped", "y", cached=True),
    ]
    assert run(stages).status == "passed"


def test_an_allowed_gate_skip_passes_and_is_recorded():
    verdicts = [*passed("loss_convergence", "gguf_tokenizer"), skipped("served_api", "no Ollama binary")]
    out = run(verdicts=verdicts, allowed={"served_api"})
    assert (out.status, out.exit_code, out.reasons) == ("passed", 0, [])
    assert out.allowed == ["gate served_api skipped: no Ollama binary"]


def test_allowing_a_stage_allows_the_gates_it_measures():
    stages = [stage("train"), stage("ollama", "skipped", "no Ollama binary"), stage("evaluate")]
    verdicts = [*passed("loss_convergence", "gguf_tokenizer"), skipped("served_api", "Ollama was skipped")]
    assert run(stages, verdicts).status == "degraded"
    out = run(stages, verdicts, allowed={"ollama"})
    assert out.status == "passed"
    assert out.allowed == [
        "stage ollama skipped: no Ollama binary",
        "gate served_api skipped: Ollama was skipped",
    ]


def test_allowing_one_stage_does_not_allow_another_stages_gates():
    verdicts = [*passed("loss_convergence", "served_api"), skipped("gguf_tokenizer", "no xllamacpp")]
    out = run(verdicts=verdicts, allowed={"ollama"})
    assert out.status == "degraded" and out.reasons == ["gate gguf_tokenizer skipped: no xllamacpp"]
    assert run(verdicts=verdicts, allowed={"llamacpp"}).status == "passed"


def test_without_gate_stages_only_the_gate_name_allows_its_skip():
    verdicts = [*passed("loss_convergence", "gguf_tokenizer"), skipped("served_api", "no Ollama binary")]
    out = decide(STAGES, verdicts, required_gates=REQUIRED, allowed={"ollama"})
    assert out.status == "degraded"


def test_a_failure_wins_over_skips_and_lists_both():
    verdicts = [verdict("loss_convergence", False, 1.0, 0.95, "flat"), skipped("served_api", "no Ollama"),
                *passed("gguf_tokenizer")]  # fmt: skip
    out = run(verdicts=verdicts)
    assert out.status == "failed" and out.reasons == ["gate loss_convergence failed: flat",
                                                      "gate served_api skipped: no Ollama"]  # fmt: skip


def test_an_allowed_skip_does_not_hide_a_failure():
    verdicts = [
        verdict("served_api", False, 0.0, 1.0, "404 missing"),
        *passed("loss_convergence", "gguf_tokenizer"),
    ]
    assert run(verdicts=verdicts, allowed={"served_api", "ollama"}).status == "failed"


def test_bad_input_is_its_own_status():
    out = run([stage("data", "failed", "train.jsonl:3: no messages")], [], bad_input=True)
    assert (out.status, out.exit_code) == ("bad_input", 2)
    assert out.reasons == ["stage data failed: train.jsonl:3: no messages"]


@pytest.mark.parametrize(("sig", "code"), [(signal.SIGINT, 130), (signal.SIGTERM, 143), (signal.SIGHUP, 129)])
def test_an_interrupted_run_exits_128_plus_the_signal(sig, code):
    failing = [verdict("loss_convergence", False, 1.0, 0.95, "flat")]
    out = run(verdicts=failing, interrupted=int(sig), bad_input=True)
    assert (out.status, out.exit_code) == ("interrupted", code)


def test_exit_codes_are_distinct():
    assert EXIT == {"passed": 0, "failed": 1, "bad_input": 2, "degraded": 3}


def test_allowed_skips_reads_the_environment_and_the_config():
    assert allowed_skips({ALLOW_ENV: "ollama, llamacpp,,"}) == {"ollama", "llamacpp"}
    assert allowed_skips({}, ["memory_efficiency"]) == {"memory_efficiency"}
    assert allowed_skips({ALLOW_ENV: "ollama"}, ["served_api"]) == {"ollama", "served_api"}
    assert allowed_skips({}) == set()


def test_allowed_skips_defaults_to_the_process_environment(monkeypatch):
    monkeypatch.setenv(ALLOW_ENV, "ollama")
    assert allowed_skips() == {"ollama"}
    monkeypatch.delenv(ALLOW_ENV)
    assert allowed_skips() == set()


def test_ft_allow_skip_in_the_environment_allows_a_missing_runtime():
    stages = [stage("train"), stage("ollama", "skipped", "no Ollama binary"), stage("evaluate")]
    verdicts = [*passed("loss_convergence", "gguf_tokenizer"), skipped("served_api", "Ollama was skipped")]
    assert run(stages, verdicts, allowed=allowed_skips({ALLOW_ENV: "ollama"})).status == "passed"
    assert run(stages, verdicts, allowed=allowed_skips({ALLOW_ENV: "llamacpp"})).status == "degraded"
