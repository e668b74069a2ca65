"""The quantized-export cases the fault suite (tiny GPT-2) and tier 3 (SmolLM2) both run on a finished run:
healthy q8_0 and q4_K_M pass, q2_K is too coarse, and each planted quantization fault is caught by its gate.
Every case goes through `finetune export RUN --as gguf:TYPE` (Ollama's quantizer, llama.cpp's judge)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from finetune import cli, faults

CASES = ("healthy gguf:q8_0", "healthy gguf:q4_K_M", "too coarse gguf:q2_K", "quant_wrong_type",
         "quant_tensor_damaged")  # fmt: skip
EXPECTED = {"too coarse gguf:q2_K": "quant_quality"} | {
    n: gate for n, (stage, _, gate) in faults.FAULTS.items() if n.startswith("quant_")
}


def run_case(run_dir: Path, case: str, model: str, plant_fault) -> tuple[dict, int, int]:
    """(the fault-table row, the exit code, the exit code the case must give)."""
    planted = case in faults.FAULTS
    form = "gguf:q4_K_M" if planted else case.split()[-1]
    if planted:
        plant_fault(case)
    code = cli.main(["export", str(run_dir), "--as", form], out=io.StringIO())
    record = json.loads((run_dir / "export" / form.replace(":", "-") / "parity.json").read_text())
    failed = [v for v in record["verdicts"] if v["status"] == "failed"]
    expected = EXPECTED.get(case)
    caught = not failed if expected is None else expected in {v["name"] for v in failed}
    want = 0 if expected is None else faults.EXIT_CODE if planted else 1
    row = dict(fault=case if planted else f"{case} export", model=model, expected=expected or "(none fails)",
               caught=caught, status={0: "passed", 1: "failed", 4: faults.STATUS}.get(code, str(code)),
               failed=[f"{v['name']} ({round(v['measured'], 4)} vs {v['threshold']})" for v in failed])  # fmt: skip
    return row, code, want
