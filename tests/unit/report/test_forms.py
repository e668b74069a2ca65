"""The shipped-forms table: one row per form, from the ship stage's details, in the console and the HTML."""

from __future__ import annotations

from finetune.report.forms import HEADERS, form_rows
from finetune.report.html import render_html
from finetune.report.models import StageReport
from finetune.report.summary import render_summary
from tests.unit.report.report_builders import make_report

FORMS = {
    "peft": {"bytes": 2 * 2**20, "verdicts": {"peft_parity": "passed"}},
    "gguf:q4_K_M": {"bytes": 101 * 2**20, "verdicts": {"quant_types": "passed", "quant_quality": "failed"},
                    "kl_mean": 0.0512, "kl_p99": 0.314, "top1": 0.894, "ppl_ratio": 0.934,
                    "llamacpp_tokens_per_second": 144.2, "ollama_tokens_per_second": 97.0,
                    "scores": {"f16": {"train": 0.875, "heldout": 0.5}, "q4_K_M": {"train": 0.875, "heldout": 0.375},
                               "ollama q4_K_M": {"train": 0.75, "heldout": None}}},
}  # fmt: skip


def _report():
    report = make_report()
    report.stages.append(StageReport(name="ship", details={"forms": FORMS}))
    return report


def test_each_form_gets_its_measurements_and_the_worst_verdict():
    peft, q4 = form_rows(_report())
    assert peft == ["peft", "2.0", "-", "-", "-", "-", "-", "-", "-", "passed"]
    assert q4 == [
        "gguf:q4_K_M",
        "101.0",
        "0.0512",
        "0.314",
        "0.894",
        "0.934",
        "144",
        "97",
        "88%/38%; 75%/-",
        "failed",
    ]


def test_the_console_and_the_html_show_the_table_only_when_forms_were_shipped():
    text = render_summary(_report())
    assert "shipped: " + " | ".join(HEADERS) in text and "shipped: gguf:q4_K_M | 101.0" in text
    assert "<h2>Shipped forms</h2>" in render_html(_report()) and "gguf:q4_K_M" in render_html(_report())
    assert form_rows(make_report()) == [] and "shipped:" not in render_summary(make_report())
    assert "Shipped forms" not in render_html(make_report())
