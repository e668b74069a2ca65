"""`finetune export RUN --as peft|gguf-lora`: the adapter a run trained and judged, in the form another runtime
loads, judged again there (finetune.gates.adapter_parity) before it is called shipped."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

from finetune import faults
from finetune.errors import UserError
from finetune.system.atomic import atomic_write_json
from finetune.system.hashing import dir_sha256
from finetune.system.lock import run_dir_lock
from finetune.system.owned import claim
from finetune.train.checkpoints import ADAPTER_DIR

FORMS = ("peft", "gguf-lora")
PROBE_TEXTS = 4  # training rows whose every position and vocabulary entry are compared
PROBE_TOKENS = 128
REPORT = "parity.json"


def probe_ids(run_dir: Path, tokenizer: Any) -> list[list[int]]:
    from finetune.system.jsonl import read_jsonl

    rows = read_jsonl(Path(run_dir) / "data" / "train.jsonl")[:PROBE_TEXTS]
    return [list(tokenizer.encode(r["text"]))[:PROBE_TOKENS] for r in rows]


def export_run(
    run_dir: Path, form: str, out: Path | None, resolve_model: Callable, log: Callable[[str], None]
) -> int:
    """Export, measure and judge; 0 when the export computes what the run's adapter computes, else 1."""
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
        out = claim(out, flag="--out") if out else run_dir / "export" / form
        base = Path(resolve_model(cfg.model.name).path)
        ids = probe_ids(run_dir, AutoTokenizer.from_pretrained(str(base)))
        shipped, v = (_peft if form == "peft" else _gguf_lora)(cfg, adapter, base, out, ids)
        sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir()) if p.is_file() and p.name != REPORT}
        record = {"verdict": v.model_dump(), "adapter_sha256": dir_sha256(adapter)[0], "bytes": sizes}
        atomic_write_json(out / REPORT, record)
        rejected = shipped.with_name(f"{shipped.name}.rejected")
        if v.passed:
            rejected.unlink(missing_ok=True)  # an earlier export's, judged on other bytes
        else:  # nothing that failed its gate stays loadable by accident
            shipped.replace(rejected)
    log(str(v))
    planted = faults.injected()  # an export with a fault planted is never called shippable
    shipped_bytes = ", ".join(f"{name} {size / 2**20:.1f} MiB" for name, size in sizes.items())
    log(f"{'exported' if v.passed and not planted else 'NOT shippable'}: {out} ({shipped_bytes})")
    if planted:
        log(f"faults planted on purpose ({faults.ENV}): {', '.join(planted)}")
        return faults.EXIT_CODE
    return 0 if v.passed else 1


def _peft(cfg: Any, adapter: Path, base: Path, out: Path, ids: list[list[int]]) -> tuple[Path, Any]:
    from finetune.evaluate.adapter_measure import measure_peft
    from finetune.export.peft_adapter import PEFT_WEIGHTS, export_peft
    from finetune.gates.adapter_parity import peft_parity

    export_peft(adapter, base, out, base_name=cfg.model.name)
    return out / PEFT_WEIGHTS, peft_parity(
        measure_peft(base, adapter, out, ids), cfg.gates.adapter_floor_multiple
    )


def _gguf_lora(cfg: Any, adapter: Path, base: Path, out: Path, ids: list[list[int]]) -> tuple[Path, Any]:
    """adapter.gguf from the PEFT form by llama.cpp's converter, and the base GGUF it applies to."""
    import tempfile

    from finetune.evaluate.adapter_measure import measure_gguf_lora
    from finetune.export.gguf import convert_hf_to_gguf
    from finetune.export.gguf_lora import export_gguf_lora
    from finetune.export.peft_adapter import export_peft
    from finetune.gates.adapter_parity import gguf_lora_parity

    lora, base_gguf = out / "adapter.gguf", out / f"base-{cfg.export.gguf_type}.gguf"
    with tempfile.TemporaryDirectory(
        prefix=".peft.", suffix=".tmp", dir=out if out.is_dir() else None
    ) as peft:
        export_peft(adapter, base, Path(peft), base_name=cfg.model.name, weight_layout=True)
        export_gguf_lora(Path(peft), base, lora)
    convert_hf_to_gguf(base, base_gguf, cfg.export.gguf_type)
    m = measure_gguf_lora(base, adapter, base_gguf, lora, ids)
    return lora, gguf_lora_parity(m, cfg.gates.adapter_floor_multiple)
