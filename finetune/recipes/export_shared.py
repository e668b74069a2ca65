"""`finetune export RUN_A RUN_B ... --as gguf-lora --out DIR`: several fine-tunes of one base shipped as one base
GGUF and one small GGUF LoRA each, every adapter judged in llama.cpp (gguf_lora_parity) and all of them served
side by side by one Ollama (served_adapter per run, adapters_separate across them). DIR/shared.json records the
verdicts and the bytes shipped: the base once plus the adapters, against one fused GGUF per model."""

from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune import faults
from finetune.errors import UserError
from finetune.gates.status import EXIT
from finetune.system.atomic import atomic_write_json, atomic_write_text
from finetune.system.lock import run_dir_lock
from finetune.system.owned import claim
from finetune.train.checkpoints import ADAPTER_DIR

REPORT = "shared.json"


def export_shared(
    run_dirs: list[Path],
    out: Path | None,
    resolve_model: Callable,
    log: Callable[[str], None],
    locate_ollama: Callable[[], Any],
) -> int:
    from finetune.evaluate.adapter_measure import write_record
    from finetune.stages.rundir import own_config

    if out is None:
        raise UserError(
            f"{len(run_dirs)} runs share one base GGUF: name the folder it ships in with --out DIR"
        )
    if len({Path(r).resolve() for r in run_dirs}) < len(run_dirs):
        raise UserError(f"a run is named twice in {', '.join(map(str, run_dirs))}: each run ships once")
    cfgs = [own_config(Path(r), None, command="export") for r in run_dirs]
    names = _names([Path(r) for r in run_dirs])
    base = _one(
        {str(resolve_model(c.model.name).path) for c in cfgs},
        "base model",
        run_dirs,
        [c.model.name for c in cfgs],
    )
    gguf_type = _one(
        {c.export.gguf_type for c in cfgs}, "export.gguf_type", run_dirs, [c.export.gguf_type for c in cfgs]
    )
    for r in run_dirs:
        if not (Path(r) / ADAPTER_DIR / "adapters.safetensors").is_file():
            raise UserError(f"{r}: no trained adapter in {Path(r) / ADAPTER_DIR}: train it first")
    location = locate_ollama()
    if location.binary is None:
        raise UserError(f"serving adapters side by side needs Ollama: {location.reason}")
    binary = Path(location.binary)
    with contextlib.ExitStack() as stack:
        for r in run_dirs:
            stack.enter_context(run_dir_lock(Path(r), "finetune export --as gguf-lora (shared base)"))
        out = claim(out, flag="--out")
        record = _ship(cfgs, [Path(r) for r in run_dirs], names, Path(base), gguf_type, out, binary)
        for run, (name, verdicts) in zip(run_dirs, record.pop("runs").items(), strict=True):
            write_record(out / name, "gguf-lora", verdicts, Path(run) / ADAPTER_DIR)
            for v in verdicts:
                log(f"{name}: {v}")
            if any(v.status == "failed" for v in verdicts):
                (out / name / "adapter.gguf").replace(out / name / "adapter.gguf.rejected")
        atomic_write_json(out / REPORT, {**record, "verdict": record["verdict"].model_dump()})
    log(str(record["verdict"]))
    log(_bytes_line(record["bytes"]))
    failed = any(s == "failed" for s in record["statuses"])
    log(f"{'NOT shippable' if failed or faults.injected() else 'exported'}: {out}")
    if faults.injected():
        return faults.EXIT_CODE
    return EXIT["failed"] if failed else EXIT["passed"]


def _ship(cfgs, run_dirs, names, base: Path, gguf_type: str, out: Path, binary: Path) -> dict[str, Any]:
    from transformers import AutoTokenizer

    from finetune.evaluate.adapter_measure import measure_gguf_lora, probe_ids
    from finetune.evaluate.served_adapter import (
        NoQuestions,
        adapter_modelfile,
        ask_served,
        compare,
        mlx_probes,
    )
    from finetune.export.gguf import convert_hf_to_gguf
    from finetune.export.gguf_lora import export_gguf_lora
    from finetune.export.peft_adapter import export_peft
    from finetune.gates.adapter_parity import adapters_separate, gguf_lora_parity, served_adapter

    base_gguf = convert_hf_to_gguf(base, out / f"base-{gguf_type}.gguf", gguf_type)
    tokenizer = AutoTokenizer.from_pretrained(str(base))
    loras, runs = [], {}
    for cfg, run, name in zip(cfgs, run_dirs, names, strict=True):
        (out / name).mkdir()
        with tempfile.TemporaryDirectory(prefix=".peft.", suffix=".tmp", dir=out) as tmp:
            export_peft(run / ADAPTER_DIR, base, Path(tmp), base_name=cfg.model.name, weight_layout=True)
            loras.append(export_gguf_lora(Path(tmp), base, out / name / "adapter.gguf"))
        m = measure_gguf_lora(base, run / ADAPTER_DIR, base_gguf, loras[-1], probe_ids(run, tokenizer))
        runs[name] = [gguf_lora_parity(m, cfg.gates.adapter_floor_multiple)]
    packaged = faults.point("adapters_swapped", loras)  # what each Modelfile's ADAPTER names
    for cfg, run, name, lora in zip(cfgs, run_dirs, names, packaged, strict=True):
        atomic_write_text(
            out / name / "Modelfile",
            adapter_modelfile(cfg, run, tokenizer, base, base_gguf, lora, out / name),
        )
    try:
        probes = {
            n: mlx_probes(c, r, base, r / ADAPTER_DIR) for c, r, n in zip(cfgs, run_dirs, names, strict=True)
        }
    except NoQuestions as exc:  # side by side means asking each model every run's questions
        raise UserError(f"adapters served side by side are judged on their runs' questions: {exc}") from None
    served = ask_served(  # one private Ollama serving every model; each asked every run's questions
        binary, out, {n: out / n / "Modelfile" for n in names}, {n: probes[n].prompts for n in names}
    )
    own, cross = {}, {}
    for cfg, name in zip(cfgs, names, strict=True):
        v = served_adapter(compare(probes[name], served[name][name]), cfg.gates.text_agreement)
        runs[name].append(v)
        own[name] = v.measured
        cross[name] = {n: _gives(served[name][n], probes[n]) for n in names if n != name}
    verdict = adapters_separate(own, cross, cfgs[0].gates.text_agreement)
    base_bytes = base_gguf.stat().st_size
    sizes = {n: (out / n / "adapter.gguf").stat().st_size for n in names}
    statuses = [v.status for vs in runs.values() for v in vs] + [verdict.status]
    return {"runs": runs, "verdict": verdict, "statuses": statuses,
            "bytes": {"base": base_bytes, "adapters": sizes, "fused_each": base_bytes}}  # fmt: skip


def _gives(answers: list[str], probes: Any) -> float:
    """Share of the questions whose answer the run's adapter changes that get that run's answer anyway."""
    from finetune.evaluate.served_adapter import _same

    changed = probes.changed
    return sum(_same(answers[i], probes.tuned[i]) for i in changed) / len(changed) if changed else 0.0


def _names(run_dirs: list[Path]) -> list[str]:
    names: list[str] = []
    for r in run_dirs:
        name, k = r.resolve().name, 2
        while name in names:
            name, k = f"{r.resolve().name}-{k}", k + 1
        names.append(name)
    return names


def _one(values: set[str], what: str, run_dirs: list[Path], each: list[str]) -> str:
    if len(values) != 1:
        pairs = ", ".join(f"{r}: {v}" for r, v in zip(run_dirs, each, strict=True))
        raise UserError(f"runs shipped on one base must share their {what}; they differ ({pairs})")
    return values.pop()


def _bytes_line(b: dict[str, Any]) -> str:
    mib = 2**20
    shipped = b["base"] + sum(b["adapters"].values())
    each = ", ".join(f"{n} {s / mib:.1f} MiB" for n, s in b["adapters"].items())
    return (
        f"shipped: base {b['base'] / mib:.1f} MiB once + adapters ({each}) = {shipped / mib:.1f} MiB; as fused "
        f"GGUFs: {len(b['adapters'])} x {b['fused_each'] / mib:.1f} MiB = {len(b['adapters']) * b['fused_each'] / mib:.1f} MiB"
    )
