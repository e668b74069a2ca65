"""The export cases the fault suite (tiny GPT-2) and tier 3 (SmolLM2) run on a finished run, each through
`finetune export RUN --as FORM`: healthy adapters and quantized GGUFs pass, q2_K is too coarse, and every planted
export fault is caught by its gate (faults.FAULTS names it)."""

from __future__ import annotations

import io
import json
from pathlib import Path

from finetune import cli, faults
from finetune.system.hashing import dir_sha256
from finetune.train.checkpoints import ADAPTER_DIR

TOO_COARSE = {"too coarse gguf:q2_K": "quant_quality"}  # a user's choice the quality bar must refuse
FORM_OF = {"peft_alpha_missing": "peft", "gguf_lora_alpha_missing": "gguf-lora", "adapter_wrong_base": "gguf-lora",
           "quant_wrong_type": "gguf:{quant}", "quant_tensor_damaged": "gguf:{quant}",
           "quant_of_base": "gguf:{quant}"}  # fmt: skip
SHARED_FAULTS = ("adapters_swapped",)  # several runs on one base: tests/faults and tier 3 run them apart
FAULTS = tuple(
    n for n, (stage, _, _) in faults.FAULTS.items() if stage == "export" and n not in SHARED_FAULTS
)


# The type each model ships healthy: the tiny GPT-2's random, sharp logits measure KL 0.19 at q4_K_M (bar 0.10),
# too coarse for it, and q8_0 0.003; SmolLM2 and Gemma 3 pass q4_K_M (README's quality table).
SHIPS_AS = {"tiny-gpt2": "q8_0"}


def quant_for(model: str) -> str:
    return SHIPS_AS.get(model, "q4_K_M")


def cases(quant: str) -> tuple[str, ...]:
    """quant: the type the model ships healthy and the quantization faults are planted on (quant_for)."""
    healthy = dict.fromkeys(
        ("healthy peft", "healthy gguf-lora", "healthy gguf:q8_0", f"healthy gguf:{quant}")
    )
    return (*healthy, *TOO_COARSE, *FAULTS)


def run_case(run_dir: Path, case: str, model: str, plant_fault) -> tuple[dict, int, int]:
    """(the fault-table row, the exit code, the exit code the case must give)."""
    quant = quant_for(model)
    planted = case in faults.FAULTS
    form = FORM_OF[case].format(quant=quant) if planted else case.split()[-1]
    if planted:
        plant_fault(case)
    code = cli.main(["export", str(run_dir), "--as", form], out=io.StringIO())
    record = json.loads((run_dir / "export" / form.replace(":", "-") / "parity.json").read_text())
    failed = [v for v in record["verdicts"] if v["status"] != "passed"]
    expected = faults.FAULTS[case][2] if planted else TOO_COARSE.get(case)
    caught = not failed if expected is None else expected in {v["name"] for v in failed}
    want = 0 if expected is None else faults.EXIT_CODE if planted else 1
    row = dict(fault=case if planted else f"{case} export", model=model, expected=expected or "(none fails)",
               caught=caught, status={0: "passed", 1: "failed", 3: "degraded", 4: faults.STATUS}.get(code, str(code)),
               failed=[f"{v['name']} ({v['status']}: {v['measured'] if v['measured'] is None else round(v['measured'], 4)}"
                       f" vs {v['threshold']})" for v in failed])  # fmt: skip
    return row, code, want


def run_shared(run_dirs: list[Path], out: Path, case: str, model: str, plant_fault) -> tuple[dict, int, int]:
    """`finetune export RUN_A RUN_B --as gguf-lora --out OUT`: (the fault-table row, exit code, the one it must give)."""
    planted = case in faults.FAULTS
    if planted:
        plant_fault(case)
    code = cli.main(
        ["export", *map(str, run_dirs), "--as", "gguf-lora", "--out", str(out)], out=io.StringIO()
    )
    verdict = json.loads((out / "shared.json").read_text())["verdict"]
    records = [json.loads(p.read_text()) for p in sorted(out.glob("*/parity.json"))]
    adapters = {dir_sha256(r / ADAPTER_DIR)[0] for r in run_dirs}
    assert len(records) == len(run_dirs) and {r["adapter_sha256"] for r in records} == adapters, (
        "each run's parity.json names the adapter it judged, by content"
    )
    failed = verdict["status"] == "failed"
    row = dict(fault=case if planted else "healthy shared-base export", model=model,
               expected="adapters_separate" if planted else "(none fails)", caught=failed == planted,
               status={0: "passed", 1: "failed", 4: faults.STATUS}.get(code, str(code)),
               failed=[f"adapters_separate ({round(verdict['measured'], 4)} vs {verdict['threshold']})"] if failed
               else [])  # fmt: skip
    return row, code, faults.EXIT_CODE if planted else 0
