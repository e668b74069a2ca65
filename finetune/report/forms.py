"""The table a user picks a shipping form by (`finetune pipeline` with export.adapters / export.gguf_types): per
form its bytes, quality against the f16 GGUF, decode speed, the fine-tune's answers kept, and its verdict."""

from __future__ import annotations

from typing import Any

from finetune.report.models import RunReport

HEADERS = ("form", "MiB", "KL mean", "KL p99", "top-1", "ppl x", "llama.cpp tok/s", "Ollama tok/s",
           "answers train/heldout (llama.cpp; Ollama)", "verdict")  # fmt: skip


def _n(x: Any, fmt: str = ".3g") -> str:
    return "-" if not isinstance(x, int | float) else format(x, fmt)


def _share(s: dict[str, Any] | None) -> str:
    return "-" if not s else "/".join(_n(s.get(k), ".0%") for k in ("train", "heldout"))


def form_rows(report: RunReport) -> list[list[str]]:
    """One row of plain text per shipped form ([] when the run shipped none)."""
    ship = next((s for s in report.stages if s.name == "ship"), None)
    rows = []
    for form, d in ((ship.details.get("forms") or {}) if ship else {}).items():
        qtype = form.removeprefix("gguf:")
        scores = d.get("scores") or {}
        answers = f"{_share(scores.get(qtype))}; {_share(scores.get(f'ollama {qtype}'))}" if scores else "-"
        statuses = set(d.get("verdicts", {}).values())
        verdict = next((s for s in ("failed", "skipped") if s in statuses), "passed")
        rows.append([form, _n(d.get("bytes", 0) / 2**20, ".1f"), _n(d.get("kl_mean")), _n(d.get("kl_p99")),
                     _n(d.get("top1")), _n(d.get("ppl_ratio")), _n(d.get("llamacpp_tokens_per_second"), ".0f"),
                     _n(d.get("ollama_tokens_per_second"), ".0f"), answers, verdict])  # fmt: skip
    return rows
