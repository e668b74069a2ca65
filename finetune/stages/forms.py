"""The pipeline's shipping forms: every adapter form in `export.adapters` and quantized GGUF in `export.gguf_types`,
exported and judged where users load it by `finetune export RUN --as FORM`'s own code (deps.ship_form) into
RUN/export/<form>/. Each gate the forms share gets one verdict over all of them (failed if one failed), the
per-form verdicts and measurements kept for the report's table of formats."""

from __future__ import annotations

import contextlib
import threading
import time
from pathlib import Path
from typing import Any

from finetune.config.schema import RunConfig
from finetune.gates.provenance import explain
from finetune.gates.verdict import Verdict, skipped
from finetune.report.artifacts import artifact
from finetune.report.models import StageReport
from finetune.stages.context import Ctx, Stage
from finetune.system.beside import Worker

# The gates `finetune export --as FORM` judges, by form ("gguf" for every gguf:<type>).
FORM_GATES = {
    "peft": ("peft_parity",),
    "gguf-lora": ("gguf_lora_parity", "served_adapter"),
    "gguf": ("quant_types", "quant_quality", "quant_answers"),
}
RANK = {"failed": 0, "skipped": 1, "passed": 2}


def form_gates(cfg: RunConfig) -> tuple[str, ...]:
    """The gates the configured forms add to the pipeline's required ones."""
    return tuple(dict.fromkeys(g for form in cfg.export.forms() for g in FORM_GATES[form.split(":")[0]]))


def combined(name: str, per_form: dict[str, Verdict]) -> Verdict:
    """One verdict for a gate over every form that judged it: the worst one's status, measured value and
    threshold (a failure first, then a skip), each form's detail in order."""
    worst_form, worst = min(per_form.items(), key=lambda kv: RANK.get(kv[1].status, 0))
    detail = "; ".join(f"{form}: {v.detail}" for form, v in per_form.items())
    forms = {
        form: v.model_dump(include={"status", "measured", "threshold", "detail"})
        for form, v in per_form.items()
    }
    return explain(
        Verdict(name=name, status=worst.status, measured=worst.measured, threshold=worst.threshold, detail=detail,
                data={"worst": worst_form, "forms": forms})
    )  # fmt: skip


def stage_ship(ctx: Ctx) -> StageReport:
    forms = ctx.cfg.export.forms()
    gates = form_gates(ctx.cfg)
    if ctx.deps.ship_form is None:
        why = "no exporter was wired in (deps.ship_form): the forms were not shipped"
        return StageReport(
            status="skipped", reason=why, verdicts=[skipped(g, why) for g in gates], record=False
        )
    shipped, seconds, skips = _ship_every_form(ctx, forms)
    by_gate: dict[str, dict[str, Verdict]] = {}
    for form in forms:  # the config's order, however they finished
        for v in skips[form] if form in skips else shipped[form].verdicts:
            by_gate.setdefault(v.name, {})[form] = v
    results = [shipped[f] for f in forms if f in shipped]
    verdicts = [combined(name, per_form) for name, per_form in by_gate.items()]
    details = {"forms": {r.form: {**_row(r), "seconds": seconds[r.form]} for r in results}}
    return StageReport(
        outputs={"forms": {r.form: str(r.out) for r in results}},
        artifacts=[artifact(f"export {r.form}", r.out) for r in results],
        details=details,
        verdicts=verdicts,
        record=not any(v.status == "skipped" for v in verdicts),  # a missing runtime may be there next time
    )


def _ship_every_form(ctx: Ctx, forms: list[str]) -> tuple[dict[str, Any], dict[str, float], dict[str, list]]:
    """(form -> its Shipped, form -> seconds, form -> the skipped verdicts of a form that could not be made)."""
    base = Path(ctx.outputs["model"]["path"])
    ollama = ctx.deps.locate_ollama()  # located once, for every form (as `finetune export` does)
    shipped: dict[str, Any] = {}
    seconds: dict[str, float] = {}
    skips: dict[str, list] = {}
    lock = threading.Lock()

    def log(line: str) -> None:  # two threads log: one whole line at a time
        with lock:
            ctx.log(line)

    # The quantized GGUFs are made and judged by child processes (Ollama's quantizer, llama.cpp, Ollama): they
    # ship on the other core while this thread ships the adapters, which it judges against MLX in-process.
    # Their decode speeds are measured after, when nothing runs beside.
    quantized = [f for f in forms if f.startswith("gguf:")]
    side_by_side = bool(quantized) and len(quantized) < len(forms)

    def one(form: str) -> None:
        if form.startswith("gguf:") and ollama.binary is None:  # the quantizer is Ollama's: a skip, no pass
            why = f"{form} is quantized by Ollama's quantizer, and none was found: {ollama.reason}"
            log(f"[ship] {form}: skipped: {why}")
            skips[form] = [skipped(g, why) for g in FORM_GATES["gguf"]]
            return
        log(f"[ship] {form}: exporting and judging it where users load it")
        tic = time.perf_counter()
        result = ctx.deps.ship_form(ctx.cfg, ctx.run_dir, base, form, lambda: ollama, ctx.deps.ollama_server,
                                    speed=not side_by_side)  # fmt: skip
        for v in result.verdicts:
            log(f"[ship] {form} {v}")
        shipped[form], seconds[form] = result, round(time.perf_counter() - tic, 2)

    worker = Worker(lambda: [one(f) for f in quantized], "ft-ship-gguf") if side_by_side else None
    try:
        for form in forms:
            if worker is None or form not in quantized:
                one(form)
    except Exception:
        if worker is not None:  # nothing of this stage writes after it has ended
            with contextlib.suppress(Exception):
                worker.join()
        raise
    if worker is not None:
        worker.join()  # re-raises what a quantized form raised
    for form in quantized:
        if form in shipped and shipped[form].later is not None:
            speeds = shipped[form].later()
            log(f"[ship] {form} decode speed, nothing beside: " + ", ".join(
                f"{k.split('_')[0]} {v:.0f} tok/s" for k, v in speeds.items() if v))  # fmt: skip
    return shipped, seconds, skips


def _row(r: Any) -> dict[str, Any]:
    """What a user picks a format by: bytes, verdicts, and for a quantized GGUF its quality and speed."""
    q = r.extra.get("quantized", {})
    keep = ("kl_mean", "kl_p99", "top1", "ppl_ratio", "llamacpp_tokens_per_second", "ollama_tokens_per_second",
            "scores")  # fmt: skip
    return {
        "folder": str(r.out),
        "bytes": sum(r.sizes.values()),
        "verdicts": {v.name: v.status for v in r.verdicts},
        **{k: q[k] for k in keep if k in q},
    }


def ship_inputs(ctx: Ctx) -> dict[str, Any]:
    # the gates' bars, the Modelfile and the scored questions; the adapter, the fused model and the f16 GGUF
    return {
        **ctx.section("export", "gates", "deploy", "data"),
        **ctx.upstream("model", "train", "fuse", "gguf"),
    }


SHIP = Stage("ship", stage_ship, ship_inputs)
