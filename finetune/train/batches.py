"""Token datasets and batches for mlx-lm's trainer, with per-token loss masks (read from disk: splits.py).

mlx-lm masks only a prompt prefix; we carry a mask per token so multi-turn chats train on every
assistant turn. The batch order is a pure function of (seed, step), which is what makes resume exact.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from finetune.data.tokens import batch_width


@dataclass
class TokenDataset:
    """(ids, mask) pairs; mask is 1 where the token is a training target."""

    items: list[tuple[list[int], list[int]]]
    source: str = ""
    rows: list[int] = field(default_factory=list)  # 0-based line of each item in the split file

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, idx: int) -> tuple[list[int], list[int]]:
        return self.items[idx]


def pack(
    rows: Sequence[tuple[Sequence[int], Sequence[int]]], max_seq_length: int
) -> tuple[np.ndarray, np.ndarray]:
    """Zero end padding to batch_width: 1 + a multiple of PAD_TO, like mlx-lm, so compiled shapes repeat."""
    longest = max(len(ids) for ids, _ in rows)
    width = batch_width(longest, max_seq_length)
    ids_arr = np.zeros((len(rows), width), np.int32)
    mask_arr = np.zeros((len(rows), width), np.float32)
    for i, (ids, mask) in enumerate(rows):
        n = min(len(ids), width)
        ids_arr[i, :n] = ids[:n]
        mask_arr[i, :n] = mask[:n]
    return ids_arr, mask_arr


def _pack(rows: list[tuple[list[int], list[int]]], max_seq_length: int) -> tuple[mx.array, mx.array]:
    ids, mask = pack(rows, max_seq_length)
    return mx.array(ids), mx.array(mask)


def _length_buckets(dataset: TokenDataset, batch_size: int) -> list[list[int]]:
    """Group similar lengths into batches (less padding), like mlx-lm does."""
    order = sorted(range(len(dataset)), key=lambda i: len(dataset[i][0]))
    return [order[i : i + batch_size] for i in range(0, len(order) - batch_size + 1, batch_size)]


def longest_batch(dataset: TokenDataset, batch_size: int) -> list[int]:
    """Example indices of the batch of the longest rows: every epoch trains it, and it sets a run's peak memory."""
    buckets = _length_buckets(dataset, batch_size)
    return buckets[-1] if buckets else list(range(len(dataset)))


def batch_at(dataset: TokenDataset, batch_size: int, seed: int, index: int) -> list[int]:
    """Example indices of training batch number `index` (0-based): a pure function, for exact resume."""
    buckets = _length_buckets(dataset, batch_size)
    epoch, pos = divmod(index, len(buckets))
    perm = np.random.default_rng([seed, epoch]).permutation(len(buckets))
    return buckets[perm[pos]]


def make_iterate_batches(
    seed: int,
    start_batch: int = 0,
    build: Callable[[list, int], Any] | None = None,
    train_build: Callable[[list, int], Any] | None = None,
) -> Callable[..., Iterator]:
    """An `iterate_batches` for mlx_lm.tuner.train that starts at batch `start_batch`; `build(rows,
    max_seq_length)` makes a batch of the chosen examples (default: padded ids + mask), `train_build` a training
    batch (default: build; a rank of a data-parallel run builds its shard: finetune.train.distributed)."""
    build = build or _pack
    train_build = train_build or build

    def iterate_batches(dataset, batch_size, max_seq_length, loop=False, comm_group=None, **_):
        if len(dataset) < batch_size:
            if loop:
                raise ValueError(
                    f"{dataset.source or 'dataset'}: {len(dataset)} examples, fewer than batch_size={batch_size}"
                )
            batch_size = len(dataset)
        if not loop:  # evaluation: every example once, in a fixed order
            for i in range(0, len(dataset), batch_size):
                yield build([dataset[j] for j in range(i, min(i + batch_size, len(dataset)))], max_seq_length)
            return
        index = start_batch
        while True:
            yield train_build(
                [dataset[j] for j in batch_at(dataset, batch_size, seed, index)], max_seq_length
            )
            index += 1

    return iterate_batches


def masked_loss(model, batch: mx.array, mask: mx.array) -> tuple[mx.array, mx.array]:
    """Mean cross-entropy over target tokens whose mask is 1 (mlx-lm's loss signature)."""
    inputs, targets = batch[:, :-1], batch[:, 1:]
    weights = mask[:, 1:]
    logits = model(inputs)
    ce = nn.losses.cross_entropy(logits, targets) * weights
    ntoks = weights.sum()
    return ce.astype(mx.float32).sum() / ntoks, ntoks
