"""finetune.report.summary: the console summary of a run report."""

from finetune.report.models import validate_report
from finetune.report.summary import render_summary


def test_summary_lists_stages_gates_and_scores(healthy):
    healthy["stages"].append({"name": "ollama", "status": "skipped", "seconds": 0.0, "cached": True,
                              "reason": "no Ollama binary"})  # fmt: skip
    healthy["gates"].append({"name": "memory", "status": "failed", "measured": None, "threshold": 0.3,
                             "detail": "LoRA saved 5%"})  # fmt: skip
    lines = render_summary(validate_report(healthy)).splitlines()
    assert lines[0] == "pipeline PASSED (exit 0) in 60 s: /tmp/run"
    assert lines[1].split() == ["passed", "prepull", "0.1", "s"]
    assert lines[2].split()[:4] == ["skipped", "ollama", "0.0", "s"]
    assert lines[2].endswith("s (cached)  no Ollama binary")
    assert lines[3] == "  [PASS] output_parity: measured 1 vs 0.9: ok"
    assert lines[4] == "  [FAIL] memory: measured - vs 0.3: LoRA saved 5%"
    assert lines[5].split() == ["score", "ollama", "train", "2/2", "heldout", "1/2"]
    assert len(lines) == 6


def test_summary_says_why_what_was_allowed_and_how_to_resume(healthy):
    healthy.update(status="interrupted", exit_code=130, reasons=["interrupted by SIGINT"],
                   allowed_skips=["ollama: no binary"], faults=["lr_zero", "frozen_lora"],
                   resume_command="finetune run --run-dir /tmp/run --resume", command="run")  # fmt: skip
    text = render_summary(validate_report(healthy))
    lines = text.splitlines()
    assert lines[0] == "run INTERRUPTED (exit 130) in 60 s: /tmp/run"
    assert "  ! interrupted by SIGINT" in lines and "  allowed: ollama: no binary" in lines
    assert "  injected faults: lr_zero, frozen_lora" in lines
    assert lines[-1] == "interrupted; resume with: finetune run --run-dir /tmp/run --resume"


def test_a_healthy_summary_has_no_warnings(healthy):
    text = render_summary(validate_report(healthy))
    assert "!" not in text and "allowed" not in text and "faults" not in text and "resume" not in text
