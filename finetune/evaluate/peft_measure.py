"""The PEFT export measured where users load it: transformers + peft against MLX base + the trained adapter.

Every vocabulary entry's log-probability at every position is compared; the floor is the same comparison
without any adapter (torch and MLX differ in float32 arithmetic), so the gate's tolerance is k x a number
measured on this machine in the same run.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np


@dataclass(frozen=True)
class PeftMeasurement:
    """Largest |log-prob| differences over every position and vocabulary entry of the probe texts."""

    floor: float  # transformers base vs MLX base: what two runtimes differ by with no adapter at all
    gap: float  # transformers + PEFT adapter vs MLX + the trained adapter
    effect: float  # MLX + adapter vs MLX base: how much the adapter changes the model
    positions: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def measure_peft(
    base_dir: Path, adapter_dir: Path, peft_dir: Path, token_ids: list[list[int]]
) -> PeftMeasurement:
    """The PEFT export loaded by transformers + peft, against MLX base + the trained adapter, on token_ids."""
    from finetune.evaluate.decode import load, logprobs, release

    mlx = {}
    for name, adapter in (("base", None), ("adapted", adapter_dir)):
        model, _ = load(base_dir, adapter)
        mlx[name] = [logprobs(model, ids) for ids in token_ids]
        release(model)
    hf = _torch_logprobs(base_dir, peft_dir, token_ids)

    def worst(a: list[np.ndarray], b: list[np.ndarray]) -> float:
        return float(max(np.max(np.abs(x - y)) for x, y in zip(a, b, strict=True)))

    return PeftMeasurement(
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
