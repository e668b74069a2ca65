"""An exported adapter measured where users load it, against MLX base + the adapter the run trained.

transformers + peft (the PEFT form): every vocabulary entry's log-probability at every position. llama.cpp
(the GGUF LoRA on the base GGUF): its top-k at every position. The floor is the same comparison with no
adapter at all (the runtimes' own arithmetic, and the base GGUF's rounding), so a gate's tolerance is k x a
number measured on this machine in the same run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

PROBE_TEXTS = 4  # training rows whose every position and vocabulary entry are compared
PROBE_TOKENS = 128
REPORT = "parity.json"  # the verdicts an export writes beside what it ships


@dataclass(frozen=True)
class AdapterMeasurement:
    """Largest |log-prob| differences over the probe texts' positions (every vocabulary entry, or llama.cpp's top-k)."""

    floor: float  # the runtime's base vs MLX base: what the two differ by with no adapter at all
    gap: float  # the runtime + the exported adapter vs MLX + the trained adapter
    effect: float  # MLX + adapter vs MLX base: how much the adapter changes the model
    positions: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def write_record(
    out: Path, form: str, verdicts: list[Any], adapter: Path, extra: dict[str, Any] | None = None
) -> dict[str, int]:
    """out/parity.json: the verdicts, the adapter they judged (sha256 of its folder) and the bytes shipped per file
    (what failed is renamed *.rejected by the caller after, and is not counted as shipped)."""
    from finetune.system.atomic import atomic_write_json
    from finetune.system.hashing import dir_sha256

    sizes = {
        p.name: p.stat().st_size
        for p in sorted(out.iterdir())
        if p.is_file() and p.name != REPORT and not p.name.endswith(".rejected")
    }
    record = {"form": form, "verdicts": [v.model_dump() for v in verdicts], "adapter_sha256": dir_sha256(adapter)[0],
              "bytes": sizes, **(extra or {})}  # fmt: skip
    atomic_write_json(out / REPORT, record)
    return sizes


def probe_ids(run_dir: Path, tokenizer: Any) -> list[list[int]]:
    from finetune.system.jsonl import read_jsonl

    rows = read_jsonl(Path(run_dir) / "data" / "train.jsonl")[:PROBE_TEXTS]
    return [list(tokenizer.encode(r["text"]))[:PROBE_TOKENS] for r in rows]


def measure_peft(
    base_dir: Path, adapter_dir: Path, peft_dir: Path, token_ids: list[list[int]]
) -> AdapterMeasurement:
    """The PEFT export loaded by transformers + peft, against MLX base + the trained adapter, on token_ids."""
    mlx = _mlx_logprobs(base_dir, adapter_dir, token_ids)
    hf = _torch_logprobs(base_dir, peft_dir, token_ids)

    def worst(a: list[np.ndarray], b: list[np.ndarray]) -> float:
        return float(max(np.max(np.abs(x - y)) for x, y in zip(a, b, strict=True)))

    return AdapterMeasurement(
        floor=worst(hf["base"], mlx["base"]),
        gap=worst(hf["adapted"], mlx["adapted"]),
        effect=worst(mlx["adapted"], mlx["base"]),
        positions=sum(len(ids) for ids in token_ids),
    )


def _torch_logprobs(
    base_dir: Path, peft_dir: Path, token_ids: list[list[int]]
) -> dict[str, list[np.ndarray]]:
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out: dict[str, list[np.ndarray]] = {}
    with torch.no_grad():
        model = AutoModelForCausalLM.from_pretrained(str(base_dir), dtype=torch.float32).eval()

        def run(m: Any) -> list[np.ndarray]:
            return [
                torch.log_softmax(m(torch.tensor([ids])).logits[0].float(), -1).numpy() for ids in token_ids
            ]

        out["base"] = run(model)
        out["adapted"] = run(PeftModel.from_pretrained(model, str(peft_dir)).eval())
    return out


def _mlx_logprobs(
    base_dir: Path, adapter_dir: Path, token_ids: list[list[int]]
) -> dict[str, list[np.ndarray]]:
    from finetune.evaluate.decode import load, logprobs, release

    out = {}
    for name, adapter in (("base", None), ("adapted", adapter_dir)):
        model, _ = load(base_dir, adapter)
        out[name] = [logprobs(model, ids) for ids in token_ids]
        release(model)
    return out


def measure_gguf_lora(
    base_dir: Path,
    adapter_dir: Path,
    base_gguf: Path,
    lora_gguf: Path,
    token_ids: list[list[int]],
    k: int = 20,
) -> AdapterMeasurement:
    """llama.cpp's top-k with the GGUF LoRA on the base GGUF (f32 KV cache, no flash attention) vs MLX."""
    from finetune.serve import llamacpp

    mlx = _mlx_logprobs(base_dir, adapter_dir, token_ids)

    def worst(lora: Path | None, reference: list[np.ndarray]) -> float:
        gaps = [0.0]
        for ids, ref in zip(token_ids, reference, strict=True):
            rows = llamacpp.top_logprobs(base_gguf, ids, k=k, precise=True, lora=lora)
            gaps += [abs(lp - ref[i][t]) for i, row in enumerate(rows) for t, lp in row.items()]
        return float(max(gaps))

    return AdapterMeasurement(
        floor=worst(None, mlx["base"]),
        gap=worst(lora_gguf, mlx["adapted"]),
        effect=float(max(np.max(np.abs(a - b)) for a, b in zip(mlx["adapted"], mlx["base"], strict=True))),
        positions=sum(len(ids) for ids in token_ids),
    )
