"""`finetune export RUN --as peft`: the adapter a run trained and judged, in the form another runtime loads,
judged again there (finetune.gates.adapter_parity) before it is called shipped."""

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

FORMS = ("peft",)
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

    from finetune.evaluate.peft_measure import measure_peft
    from finetune.export.peft_adapter import PEFT_WEIGHTS, export_peft
    from finetune.gates.adapter_parity import peft_parity
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
        export_peft(adapter, base, out, base_name=cfg.model.name)
        m = measure_peft(base, adapter, out, probe_ids(run_dir, AutoTokenizer.from_pretrained(str(base))))
        v = peft_parity(m, cfg.gates.peft_floor_multiple)
        atomic_write_json(out / REPORT, {"verdict": v.model_dump(), "adapter_sha256": dir_sha256(adapter)[0]})
        if not v.passed:  # nothing that failed its gate stays loadable by accident
            (out / PEFT_WEIGHTS).replace(out / f"{PEFT_WEIGHTS}.rejected")
    log(str(v))
    planted = faults.injected()  # an export with a fault planted is never called shippable
    log(f"{'exported' if v.passed and not planted else 'NOT shippable'}: {out}")
    if planted:
        log(f"faults planted on purpose ({faults.ENV}): {', '.join(planted)}")
        return faults.EXIT_CODE
    return 0 if v.passed else 1
