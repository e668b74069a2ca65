"""`finetune export RUN --as peft|gguf-lora|gguf:TYPE`: what a run trained and judged, in the form another runtime
loads, judged again there (finetune.gates.adapter_parity, finetune.gates.quant_quality) before it is called
shipped."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune import faults
from finetune.errors import UserError
from finetune.evaluate.adapter_measure import probe_ids, write_record
from finetune.gates.status import EXIT, allowed_skips
from finetune.system.atomic import atomic_write_text
from finetune.system.lock import run_dir_lock
from finetune.system.owned import claim
from finetune.train.checkpoints import ADAPTER_DIR

FORMS = ("peft", "gguf-lora")  # and gguf:<type>, finetune.recipes.export_quantized
QUANTIZED = "gguf:"


def parse_form(text: str) -> str:
    """peft, gguf-lora or gguf:<type>; ValueError naming the choices."""
    from finetune.export.quant_types import TYPES

    if text in FORMS or (text.startswith(QUANTIZED) and text[len(QUANTIZED) :] in TYPES):
        return text
    types = ", ".join(f"{QUANTIZED}{t}" for t in TYPES)
    raise ValueError(f"{text!r}: choose peft, gguf-lora or a quantized GGUF ({types})")


@dataclass(frozen=True)
class Job:
    """What every export form works from: the run's own config, its judged adapter and the base it trained."""

    cfg: Any
    run_dir: Path
    adapter: Path
    base: Path
    out: Path
    tokenizer: Any
    locate_ollama: Callable[[], Any]  # -> OllamaLocation(binary, source, reason)
    ollama_server: Callable[..., Any] | None = (
        None  # (binary, folder) -> a running server; None: the real one
    )
    speed: bool = True  # a quantized GGUF's decode speed measured now; False: Shipped.later measures it


@dataclass(frozen=True)
class Shipped:
    """One form exported and judged: its folder, its verdicts and the bytes shipped per file."""

    form: str
    out: Path
    verdicts: list[Any]
    sizes: dict[str, int]
    extra: dict[str, Any]
    # what was left for a moment when nothing runs beside (Job.speed False): measures the decode speeds, adds
    # them to extra["quantized"] and to the form's parity.json, returns them
    later: Callable[[], dict[str, Any]] | None = None

    @property
    def passed(self) -> bool:
        return not any(v.status == "failed" for v in self.verdicts)


def ship(job: Job, form: str) -> Shipped:
    """Export, measure and judge one form into job.out with its parity.json; a file that failed its gate is
    renamed *.rejected, so nothing unjudged stays loadable by accident."""
    shipped, verdicts, extra = _form(form)(job)
    later = _speeds_later(job, form, shipped, extra) if form.startswith(QUANTIZED) and not job.speed else None
    result = Shipped(
        form, job.out, verdicts, write_record(job.out, form, verdicts, job.adapter, extra), extra, later
    )
    rejected = _rejected(shipped)
    if result.passed:
        rejected.unlink(missing_ok=True)  # an earlier export's, judged on other bytes
    else:
        shipped.replace(rejected)
    return result


def _rejected(shipped: Path) -> Path:
    """Where ship() keeps a file that failed its gate."""
    return shipped.with_name(f"{shipped.name}.rejected")


def _speeds_later(job: Job, form: str, shipped: Path, extra: dict[str, Any]) -> Callable[[], dict[str, Any]]:
    def measure() -> dict[str, Any]:
        from finetune.evaluate.adapter_measure import REPORT
        from finetune.recipes.export_quantized import measure_speeds
        from finetune.system.atomic import atomic_write_json

        qtype = form[len(QUANTIZED) :]
        speeds = measure_speeds(job, shipped if shipped.is_file() else _rejected(shipped), qtype)
        extra.setdefault("quantized", {}).update(speeds)
        record = json.loads((job.out / REPORT).read_text())
        record.setdefault("quantized", {}).update(speeds)
        atomic_write_json(job.out / REPORT, record)
        return speeds

    return measure


def ship_in_run(
    cfg: Any,
    run_dir: Path,
    base: Path,
    form: str,
    locate_ollama: Callable[[], Any],
    ollama_server: Callable[..., Any] | None = None,
    *,
    speed: bool = True,
) -> Shipped:
    """One form of a run into RUN/export/<form>/, as `finetune pipeline` ships export.adapters and
    export.gguf_types (deps.ship_form): the same code as `finetune export RUN --as FORM`. speed False: a
    quantized GGUF's decode speeds are left to Shipped.later (the pipeline ships forms side by side)."""
    from transformers import AutoTokenizer

    out = Path(run_dir) / "export" / form.replace(":", "-")
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    job = Job(
        cfg,
        Path(run_dir),
        Path(run_dir) / ADAPTER_DIR,
        Path(base),
        out,
        tokenizer,
        locate_ollama,
        ollama_server,
        speed,
    )
    return ship(job, form)


def export_run(
    run_dir: Path,
    form: str,
    out: Path | None,
    resolve_model: Callable,
    log: Callable[[str], None],
    locate_ollama: Callable[[], Any],
    ollama_server: Callable[..., Any] | None = None,
) -> int:
    """Export, measure and judge; 0 when every gate of the form passed, 1 when one failed, 3 when one was skipped
    (its runtime missing) without FT_ALLOW_SKIP naming it, 4 with a fault planted."""
    from transformers import AutoTokenizer

    from finetune.stages.rundir import own_config

    run_dir = Path(run_dir)
    cfg = own_config(run_dir, None, command="export")
    adapter = run_dir / ADAPTER_DIR
    if not (adapter / "adapters.safetensors").is_file():
        raise UserError(
            f"{run_dir}: no trained adapter in {adapter}: train it first (finetune train --run-dir {run_dir})"
        )
    with run_dir_lock(run_dir, f"finetune export --as {form}"):
        out = claim(out, flag="--out") if out else run_dir / "export" / form.replace(":", "-")
        base = Path(resolve_model(cfg.model.name).path)
        tokenizer = AutoTokenizer.from_pretrained(str(base))
        result = ship(Job(cfg, run_dir, adapter, base, out, tokenizer, locate_ollama, ollama_server), form)
    verdicts = result.verdicts
    failed = [v.name for v in verdicts if v.status == "failed"]
    allowed = allowed_skips()  # the only runtime an export can miss is Ollama
    skips = [v.name for v in verdicts if v.status == "skipped" and not {v.name, "ollama"} & allowed]
    for v in verdicts:
        log(str(v))
    planted = faults.injected()  # an export with a fault planted is never called shippable
    shipped_bytes = ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in result.sizes.items())
    verdict = "NOT shippable" if failed or planted else "degraded" if skips else "exported"
    log(f"{verdict}: {out} ({shipped_bytes})")
    if skips:
        log(f"not judged: {', '.join(skips)} (FT_ALLOW_SKIP={','.join(skips)} allows it)")
    if planted:
        log(f"faults planted on purpose ({faults.ENV}): {', '.join(planted)}")
        return faults.EXIT_CODE
    return EXIT["failed"] if failed else EXIT["degraded"] if skips else EXIT["passed"]


def _form(form: str) -> Callable[[Job], tuple[Path, list[Any], dict[str, Any]]]:
    if form.startswith(QUANTIZED):
        from finetune.recipes.export_quantized import gguf_quantized

        return lambda job: gguf_quantized(job, form[len(QUANTIZED) :])
    return {"peft": _peft, "gguf-lora": _gguf_lora}[form]


def _peft(job: Job) -> tuple[Path, list[Any], dict[str, Any]]:
    from finetune.evaluate.adapter_measure import measure_peft
    from finetune.export.peft_adapter import PEFT_WEIGHTS, export_peft
    from finetune.gates.adapter_parity import peft_parity

    export_peft(job.adapter, job.base, job.out, base_name=job.cfg.model.name)
    m = measure_peft(job.base, job.adapter, job.out, probe_ids(job.run_dir, job.tokenizer))
    return job.out / PEFT_WEIGHTS, [peft_parity(m, job.cfg.gates.adapter_floor_multiple)], {}


def _gguf_lora(job: Job) -> tuple[Path, list[Any], dict[str, Any]]:
    """adapter.gguf from the PEFT form by llama.cpp's converter, the base GGUF it applies to, and the Modelfile
    Ollama users create the adapter model from; judged in llama.cpp (logprobs) and Ollama (served answers)."""
    import tempfile

    from finetune.evaluate.adapter_measure import measure_gguf_lora
    from finetune.export.fuse import fuse
    from finetune.export.gguf import GGUFExportError, convert_hf_to_gguf
    from finetune.export.gguf_lora import export_gguf_lora
    from finetune.export.peft_adapter import export_peft
    from finetune.gates.adapter_parity import gguf_lora_parity
    from finetune.gates.verdict import skipped

    cfg, out = job.cfg, job.out
    lora, base_gguf = out / "adapter.gguf", out / f"base-{cfg.export.gguf_type}.gguf"
    out.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=".peft.", suffix=".tmp", dir=out) as tmp:
        peft = Path(tmp) / "peft"
        export_peft(job.adapter, job.base, peft, base_name=cfg.model.name, weight_layout=True)
        try:
            export_gguf_lora(peft, job.base, lora)
        except (
            GGUFExportError
        ) as exc:  # e.g. an architecture llama.cpp applies no LoRA to: a skip, never a pass
            why = f"llama.cpp's convert_lora_to_gguf.py could not convert the adapter: {exc}"
            return lora, [skipped("gguf_lora_parity", why), skipped("served_adapter", why)], {}
        base = faults.point(
            "adapter_wrong_base",
            job.base,
            lambda: fuse(job.base, job.adapter, Path(tmp) / "fused", dtype="float32"),
        )
        convert_hf_to_gguf(base, base_gguf, cfg.export.gguf_type)
    m = measure_gguf_lora(job.base, job.adapter, base_gguf, lora, probe_ids(job.run_dir, job.tokenizer))
    verdicts = [gguf_lora_parity(m, cfg.gates.adapter_floor_multiple), _served_adapter(job, base_gguf, lora)]
    return lora, verdicts, {}


def _served_adapter(job: Job, base_gguf: Path, lora: Path) -> Any:
    from finetune.evaluate.served_adapter import NoQuestions, adapter_modelfile, measure_served_adapter
    from finetune.gates.adapter_parity import served_adapter
    from finetune.gates.verdict import skipped
    from finetune.serve.ollama_server import OllamaCommandError

    modelfile = job.out / "Modelfile"
    text = adapter_modelfile(job.cfg, job.run_dir, job.tokenizer, job.base, base_gguf, lora, job.out)
    atomic_write_text(modelfile, text)
    location = job.locate_ollama()
    if location.binary is None:
        return skipped("served_adapter", f"no Ollama to serve the adapter with: {location.reason}")
    try:
        m = measure_served_adapter(
            job.cfg,
            job.run_dir,
            job.base,
            job.adapter,
            modelfile,
            binary=location.binary,
            server=job.ollama_server,
        )
    except OllamaCommandError as exc:  # e.g. an architecture it applies no LoRA to: a skip, never a pass
        return skipped("served_adapter", f"Ollama could not serve the adapter: {exc}")
    except NoQuestions as exc:
        return skipped("served_adapter", str(exc))
    return served_adapter(m, job.cfg.gates.text_agreement)
