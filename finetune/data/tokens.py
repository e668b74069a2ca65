"""Tokenize a rendered example with offsets, and mark which tokens are trained (the loss mask)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

PAD_TO = 32  # batches pad to this bucket, like mlx-lm, so compiled shapes repeat (finetune.train.batches)


def batch_width(longest: int, max_seq_length: int) -> int:
    """Columns of a batch whose longest row has `longest` tokens: 1 + a multiple of PAD_TO, capped."""
    return min(1 + PAD_TO * ((longest + PAD_TO - 1) // PAD_TO), max_seq_length)


def _hf_tokenizer(tokenizer: Any) -> Any:
    # mlx-lm's TokenizerWrapper is not callable; the Hugging Face tokenizer sits in its _tokenizer.
    if not callable(tokenizer) and hasattr(tokenizer, "_tokenizer"):
        return tokenizer._tokenizer
    return tokenizer


def encode(tokenizer: Any, text: str) -> tuple[list[int], list[tuple[int, int]]]:
    tok = _hf_tokenizer(tokenizer)
    try:
        enc = tok(text, add_special_tokens=False, return_offsets_mapping=True)
    except NotImplementedError as exc:
        raise TypeError(
            "tokenize_example needs a fast (Rust) tokenizer that returns offset mappings"
        ) from exc
    ids, offsets = list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]]
    # Prepend BOS the way the tokenizer's default encode would, unless the text already carries it.
    bos, bos_id = getattr(tok, "bos_token", None), getattr(tok, "bos_token_id", None)
    if bos and bos_id is not None and not text.startswith(bos):
        default = tok("a")["input_ids"]
        if len(default) > len(tok("a", add_special_tokens=False)["input_ids"]) and default[0] == bos_id:
            ids, offsets = [bos_id, *ids], [(0, 0), *offsets]
    return ids, offsets


def tokenize_example(
    tokenizer: Any,
    text: str,
    train_spans: Sequence[Sequence[int]],
    max_seq_length: int,
    mask_prompt: bool = True,
) -> tuple[list[int], list[int]]:
    """Token ids and a 0/1 loss mask (1 = token overlaps a train span), both cut to max_seq_length."""
    if max_seq_length < 1:
        raise ValueError(f"max_seq_length must be >= 1, got {max_seq_length}")
    ids, offsets = encode(tokenizer, text)
    mask = mask_for(offsets, train_spans) if mask_prompt else [1] * len(ids)
    return ids[:max_seq_length], mask[:max_seq_length]


def mask_for(offsets: Sequence[tuple[int, int]], spans: Sequence[Sequence[int]]) -> list[int]:
    # A token is trained when its characters overlap a span; zero-width (added special) tokens never are.
    return [int(s < e and any(s < se and e > ss for ss, se in spans)) for s, e in offsets]


@dataclass
class Lengths:
    unit: str  # "tokens" with a tokenizer, otherwise "chars"
    lengths: list[int]
    notes: list[str]
    truncated_share: float | None = None
    untrained: int | None = None  # rows whose trained tokens all fall past max_seq_length
    trained_tokens: dict[str, float] | None = None


def measure_lengths(rows: list[dict], tokenizer: Any, max_seq_length: int, mask_prompt: bool) -> Lengths:
    """Rendered rows' lengths (tokens, or characters without a tokenizer), truncation and trained tokens."""
    if tokenizer is None:
        note = "lengths are in characters: token stats and truncation need a tokenizer"
        return Lengths("chars", [len(r["text"]) for r in rows], [note])
    lengths, truncated, untrained, per_row, last = [], 0, 0, [], 0
    for r in rows:
        ids, offsets = encode(tokenizer, r["text"])
        lengths.append(len(ids))
        truncated += len(ids) > max_seq_length
        mask = mask_for(offsets[:max_seq_length], r["train_spans"])
        untrained += not any(mask)
        per_row.append(sum(mask[1:]) if mask_prompt else max(0, min(len(ids), max_seq_length) - 1))
        if not mask_prompt:
            mask = [1] * min(len(ids), max_seq_length)
        last = max(last, max((i for i, m in enumerate(mask) if m and i), default=0))
    # what the LM head sees per row with loss positions only, and what a frozen-prefix cache would hold
    trained_tokens = {
        "mean": round(statistics.fmean(per_row), 2),
        "max": max(per_row),
        "total": sum(per_row),
        "positions": sum(max(0, min(n, max_seq_length) - 1) for n in lengths),
        "last": last,  # tokens a batch trimmed after its last trained token feeds the model, at most
    }
    notes = []
    if untrained:
        notes.append(f"{untrained} rows have no trained tokens left after truncation to {max_seq_length}")
    return Lengths("tokens", lengths, notes, round(truncated / len(rows), 4), untrained, trained_tokens)
