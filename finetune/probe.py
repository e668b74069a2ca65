"""Measurements on a live MLX model for the gates: greedy answers, teacher-forced loss, weight snapshots."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from finetune.batches import TokenDataset, make_iterate_batches, masked_loss
from finetune.data_sources import read_jsonl

ADAPTER_LEAVES = ("lora_a", "lora_b", "m")


def read_split(path: Path, limit: int | None = None) -> list[dict]:
    rows = read_jsonl(path)
    return rows[:limit] if limit else rows


def cut_at_stops(text: str, stops: Sequence[str]) -> str:
    for stop in stops:
        if stop and stop in text:
            text = text[: text.index(stop)]
    return text.strip()


def greedy_answers(model, tokenizer, prompts: Sequence[str], *, max_tokens: int = 24,
                   stops: Sequence[str] = ()) -> list[str]:  # fmt: skip
    """Temperature-0 answers; generation ends at the tokenizer's EOS ids or a stop string."""
    from mlx_lm import generate

    model.eval()
    answers = [
        cut_at_stops(generate(model, tokenizer, prompt=p, max_tokens=max_tokens, verbose=False), stops)
        for p in prompts
    ]
    return answers


def teacher_forced_loss(model, dataset: TokenDataset, batch_size: int, max_seq_length: int) -> float:
    """Mean masked cross-entropy of the reference answers given their prompts."""
    model.eval()
    total, count = 0.0, 0.0
    for batch in make_iterate_batches(0)(dataset, batch_size, max_seq_length, loop=False):
        loss, ntoks = masked_loss(model, *batch)
        mx.eval(loss, ntoks)
        total += loss.item() * ntoks.item()
        count += ntoks.item()
    return total / count


def _is_adapter(name: str) -> bool:
    return name.rsplit(".", 1)[-1] in ADAPTER_LEAVES


def lora_snapshot(model) -> dict[str, np.ndarray]:
    return {k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters()) if _is_adapter(k)}


def base_snapshot(model) -> dict[str, np.ndarray]:
    # Copies, so later in-place training cannot change what we compare against.
    return {
        k: np.array(v.astype(mx.float32)) for k, v in tree_flatten(model.parameters()) if not _is_adapter(k)
    }
