"""Exact training shortcuts for LoRA on mlx-lm: cached frozen prefix, loss-positions-only head, trimming.

Each shortcut changes only which work is done, never the maths, so losses and gradients equal the plain
path up to float32 reassociation (different matmul shapes sum in a different order):

* cached frozen prefix: when nothing below block `cut` is trainable or random (no adapter, no dropout;
  the base is frozen), the input of block `cut` is a fixed function of the example's tokens. We compute it
  once per example, outside the gradient, and every step runs only blocks cut..N-1, the final norm and the
  head. Causal attention makes a row's real positions independent of anything after them, so caching each
  example unpadded and zero-padding the cached states to the batch width is exact wherever the loss looks.
* loss positions only: the LM head (49k-262k outputs) and cross-entropy run only where the loss weight is
  non-zero (hidden states gathered there; the final norm and any logit transform act per position, so
  gathering first changes nothing); large selections go in chunks under mx.checkpoint so the full
  (positions x vocab) float32 logits never exist at once.
* trim: columns after the last position with a non-zero loss weight cannot influence the loss (causal), so
  the batch is cut there (most of the 32-token padding, plus the answer's trailing end-of-turn tokens).

finetune.train.shortcut_plan.plan() decides what applies and says why in plain text; `make_loss()` and
`make_iterate_batches()` give mlx_lm.tuner.trainer.train (and evaluate) a loss and batches with the same
signatures as the plain ones, and the batch order is finetune.train.batches.batch_at's, so resume and seeds
behave exactly as before. Architectures: finetune.train.arch. Where a shortcut cannot be exact (adapters on every block, full fine-tuning, dropout below the cut or in the
head, sequence-length-dependent RoPE, unknown architecture) plan() leaves it off and says why.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from finetune.train import batches, distributed
from finetune.train.arch import ARCHS, Arch, run_blocks
from finetune.train.batches import masked_loss, pack
from finetune.train.shortcut_plan import Plan, plan

# ---------------------------------------------------------------- the prefix cache


class PrefixCache:
    """Input of block `cut` per example, keyed by the tokens it depends on; computed outside the gradient."""

    def __init__(self, model, p: Plan, max_seq_length: int | None = None, group: int = 16):
        # max_seq_length only caps what is stored for rows longer than any batch can be (None: no cap).
        self.model, self.plan, self.max_seq_length, self.group = model, p, max_seq_length, group
        self.arch = ARCHS[p.arch]
        self.store: dict[tuple[int, ...], mx.array | None] = {}
        self.seconds = 0.0  # time spent computing (the one-off cost)
        self.nbytes = 0

    def key(self, ids: Sequence[int]) -> tuple[int, ...]:
        # Positions that can ever be inputs with a target: 0 .. n-2 (position n-1 predicts padding).
        n = len(ids) if self.max_seq_length is None else min(len(ids), self.max_seq_length)
        return tuple(ids[: n - 1])

    def _compute(self, keys: list[tuple[int, ...]]) -> None:
        tic = time.perf_counter()
        for i in range(0, len(keys), self.group):
            part = keys[i : i + self.group]
            width = max(len(k) for k in part)
            if width == 0:  # single-token examples: no input position has a target
                for k in part:
                    self.store[k] = None
                continue
            arr = np.zeros((len(part), width), np.int32)  # end padding: causal, so real rows are exact
            for r, k in enumerate(part):
                arr[r, : len(k)] = k
            ids = mx.array(arr)
            h = run_blocks(self.model, self.arch, self.arch.embed(self.model, ids), 0, self.plan.cut)
            h = mx.stop_gradient(h)
            mx.eval(h)
            # mx.contiguous copies the slice, so the padded batch buffer is not kept alive by the cache.
            rows = [mx.contiguous(h[r, : len(k)]) for r, k in enumerate(part)]
            mx.eval(rows)
            for k, row in zip(part, rows, strict=True):
                self.store[k] = row
                self.nbytes += row.nbytes
        self.seconds += time.perf_counter() - tic

    def ensure(self, seqs: Sequence[Sequence[int]]) -> list[tuple[int, ...]]:
        keys = [self.key(s) for s in seqs]
        missing = sorted({k for k in keys if k not in self.store}, key=len)
        if missing:
            self._compute(missing)
        return keys

    def warm(self, dataset) -> None:
        """Compute every example once now (length-sorted groups), instead of lazily during the first epoch."""
        self.ensure([ids for ids, _ in dataset])

    def batch(self, seqs: Sequence[Sequence[int]], width: int) -> mx.array:
        """(B, width, D) block-`cut` inputs, zero after each row's cached positions."""
        keys = self.ensure(seqs)
        for k, ids in zip(keys, seqs, strict=True):
            if len(k) < min(len(ids) - 1, width):
                raise ValueError(
                    f"prefix cache capped at max_seq_length={self.max_seq_length}, below the batch's"
                )
        rows = [self.store[k] for k in keys]
        ref = next((r for r in rows if r is not None), None)
        if ref is None:
            raise ValueError("every row of the batch is a single token: nothing to train on")
        dim, dtype = ref.shape[-1], ref.dtype
        padded = []
        for r in rows:
            r = mx.zeros((0, dim), dtype) if r is None else r[:width]
            if r.shape[0] < width:
                r = mx.concatenate([r, mx.zeros((width - r.shape[0], dim), dtype)])
            padded.append(r)
        return mx.stack(padded)


# ---------------------------------------------------------------- batches


def build_batch(rows, max_seq_length: int, p: Plan, cache: PrefixCache | None) -> tuple[mx.array, ...]:
    """One batch for make_loss(p): (ids, mask[, block-cut inputs][, flat loss positions])."""
    ids, mask = pack(rows, max_seq_length)
    if p.trim:
        # The loss reads position j (predicting token j+1) only where mask[:, j+1] != 0; nothing after the
        # last such position can reach it through causal attention, so those columns are dead weight.
        live = np.nonzero(mask[:, 1:].any(axis=0))[0]
        need = int(live[-1]) + 1 if live.size else 1
        keep = min(ids.shape[1] - 1, -(-need // p.trim) * p.trim)
        ids, mask = ids[:, : keep + 1], mask[:, : keep + 1]
    out = [mx.array(ids), mx.array(mask)]
    if p.prefix:
        if cache is None:
            raise ValueError("this plan caches the prefix: pass a PrefixCache")
        out.append(cache.batch([r[0] for r in rows], ids.shape[1] - 1))
    if p.loss_positions:
        out.append(mx.array(np.flatnonzero(mask[:, 1:]).astype(np.int32)))
    return tuple(out)


def make_iterate_batches(
    p: Plan,
    cache: PrefixCache | None,
    seed: int,
    start_batch: int = 0,
    world: distributed.World = distributed.SINGLE,
) -> Callable[..., Iterator]:
    """finetune.train.batches.make_iterate_batches with the plan's batches: same examples, same order; a rank
    of a data-parallel world trains on its shard of each batch and evaluates every N-th batch."""

    def build(rows, max_seq_length):
        return build_batch(rows, max_seq_length, p, cache)

    iterate = batches.make_iterate_batches(seed, start_batch, build, distributed.shard_build(build, world))
    return distributed.shard_batches(iterate, world)


# ---------------------------------------------------------------- the loss


def _ce_sum(model, arch: Arch, h: mx.array, targets: mx.array, weights: mx.array) -> mx.array:
    # The same expression as finetune.train.batches.masked_loss, on the gathered rows.
    logits = arch.head(model, h)
    return (nn.losses.cross_entropy(logits, targets) * weights).astype(mx.float32).sum()


def gathered_ce_sum(
    model, arch: Arch, h: mx.array, targets: mx.array, weights: mx.array, chunk_bytes: int
) -> mx.array:
    """Sum of weighted CE over rows of h (n, D); chunks under mx.checkpoint when the logits would be large."""
    n = h.shape[0]
    if n == 0:  # no target in the batch: the plain loss is 0/0 too
        return mx.array(0.0, mx.float32)
    vocab_bytes = 4 * _vocab(model, arch)
    rows = max(1, chunk_bytes // vocab_bytes)
    if n <= rows:
        return _ce_sum(model, arch, h, targets, weights)
    module = arch.head_module(model)

    def chunk(tc, wc):
        # Targets and weights are closed over: checkpoint differentiates its arguments, and integer
        # targets have no gradient (gather_axis refuses a VJP with respect to indices).
        def ce(params, hc):
            module.update(params)  # like mlx-lm's grad_checkpoint: trainable head weights get gradients
            return _ce_sum(model, arch, hc, tc, wc)

        return mx.checkpoint(ce)  # backward recomputes this chunk's logits instead of keeping them all

    params = module.trainable_parameters()
    total = mx.array(0.0, mx.float32)
    for a in range(0, n, rows):
        total = total + chunk(targets[a : a + rows], weights[a : a + rows])(params, h[a : a + rows])
    return total


def _vocab(model, arch: Arch) -> int:
    args = getattr(model, "args", None)
    v = getattr(args, "vocab_size", None)
    if v:
        return int(v)
    return int(arch.head(model, mx.zeros((1, 1, 1))).shape[-1])  # pragma: no cover


def make_loss(p: Plan) -> Callable:
    """loss(model, *batch) -> (mean CE over weighted targets, ntoks): finetune.train.batches.masked_loss, faster.

    The batch layout is build_batch's for the same plan. With no shortcut the plain masked_loss is returned.
    """
    if not p.active:
        return masked_loss
    arch = ARCHS[p.arch]
    if not p.prefix and not p.loss_positions:
        return masked_loss  # trimming alone changes only the batch

    def loss(model, batch, mask, *extra):
        inputs, targets, weights = batch[:, :-1], batch[:, 1:], mask[:, 1:]
        if p.prefix:
            h = run_blocks(model, arch, extra[0], p.cut, p.n_blocks)
        else:
            h = run_blocks(model, arch, arch.embed(model, inputs), 0, p.n_blocks)
        ntoks = weights.sum()
        if p.loss_positions:
            idx = extra[-1]
            h = arch.norm(model, h.reshape(-1, h.shape[-1])[idx])
            ce = gathered_ce_sum(
                model, arch, h, targets.reshape(-1)[idx], weights.reshape(-1)[idx], p.chunk_bytes
            )
        else:
            ce = _ce_sum(model, arch, arch.norm(model, h), targets, weights)
        return ce / ntoks, ntoks

    return loss


# ---------------------------------------------------------------- one call for the engine


@dataclass
class Shortcuts:
    plan: Plan
    cache: PrefixCache | None
    loss: Callable
    iterate_train: Callable[..., Iterator]
    iterate_eval: Callable[..., Iterator]


def setup(
    model,
    *,
    seed: int,
    max_seq_length: int,
    train_set=None,
    val_set=None,
    start_batch: int = 0,
    cfg=None,
    warm: bool = True,
    world: distributed.World = distributed.SINGLE,
    **plan_kw,
) -> Shortcuts:
    """Plan, build the cache (optionally warm: the one-off cost is then paid before step 1), loss, batches.

    Call after adapters are attached and the base is frozen, and before training starts.
    """
    datasets = [d for d in (train_set, val_set) if d is not None]
    p = plan(model, cfg, datasets=datasets, max_seq_length=max_seq_length, **plan_kw)
    cache = PrefixCache(model, p, max_seq_length) if p.prefix else None
    if cache is not None and warm:
        for d in datasets:
            cache.warm(d)
        p.notes.append(f"prefix computed once in {cache.seconds:.1f} s ({cache.nbytes / 2**20:.1f} MiB)")
    return Shortcuts(
        plan=p,
        cache=cache,
        loss=make_loss(p),
        iterate_train=make_iterate_batches(p, cache, seed, start_batch, world),
        iterate_eval=make_iterate_batches(p, cache, seed, world=world),
    )
