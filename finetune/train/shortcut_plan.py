"""Which exact training shortcuts apply to a model as prepared for training, and why (or why not).

The decision reads the live model (which parameters are trainable, where dropout is active), not the config,
so it stays right for LoRA keys, DoRA, full fine-tuning or frozen layers; its reasons go into the run's
report. finetune.train.shortcuts implements the shortcuts themselves.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from finetune.data.tokens import PAD_TO
from finetune.train.arch import Arch, arch_logits, arch_of, run_blocks


def enabled_shortcuts(cfg: Any) -> list[str]:
    t = cfg.training
    wanted = {
        "prefix": t.cache_frozen_prefix,
        "loss_positions": t.loss_positions_only,
        "trim": t.trim_batches,
    }
    return [name for name, on in wanted.items() if on]


@dataclass
class Plan:
    """Which shortcuts apply, and why (or why not), for one model as prepared for training."""

    arch: str | None
    n_blocks: int
    cut: int = 0  # blocks [0, cut) run once per example; 0 = no cached prefix
    loss_positions: bool = False
    trim: int = 0  # batch width rounded up to a multiple of this after trimming; 0 = no trimming
    chunk_bytes: int = 256 << 20  # largest float32 logits block computed at once by the gathered head
    notes: list[str] = field(default_factory=list)

    @property
    def prefix(self) -> bool:
        return self.cut > 0

    @property
    def active(self) -> bool:
        return self.prefix or self.loss_positions or self.trim > 0

    def summary(self) -> str:
        """The decision as text for the run summary."""
        on = [
            name
            for name, used in (
                (
                    f"cached frozen prefix (blocks 0-{self.cut - 1} of {self.n_blocks} run once per example)",
                    self.prefix,
                ),
                ("LM head + loss on loss positions only", self.loss_positions),
                (f"batch trimmed after the last loss position (to a multiple of {self.trim})", self.trim > 0),
            )
            if used
        ]
        head = "exact training shortcuts: " + ("; ".join(on) if on else "none (plain mlx-lm path)")
        return "\n".join([head, *(f"  - {n}" for n in self.notes)])


def _has_trainable(module) -> bool:
    return any(True for _ in tree_flatten(module.trainable_parameters()))


def _has_dropout(module) -> bool:
    found = []

    def visit(_name, m):
        if isinstance(m, nn.Dropout | nn.Dropout2d | nn.Dropout3d) and getattr(m, "_p_1", 1.0) < 1.0:
            found.append(m)

    module.apply_to_modules(visit)
    return bool(found)


# Modules whose output at a position depends on the whole sequence length (not only on earlier positions):
# dynamic-NTK RoPE rescales its base once L exceeds max_position_embeddings. Padding, trimming and caching
# rows at their own length all change L, so the length-changing shortcuts must not apply.
LENGTH_DEPENDENT = ("DynamicNTKScalingRoPE",)


def _length_dependent(model) -> list[str]:
    return sorted({type(m).__name__ for _, m in model.named_modules()} & set(LENGTH_DEPENDENT))


# The self-check's tolerance is K_VERIFY x a noise floor measured on the spot (as in the exactness tests):
# the same logits computed as another row of a batch and as the prefix of a longer sequence (causal: the
# same maths), never below 4 ulps of the model's dtype. The adapter runs the model's own ops in the same
# shapes, so it usually agrees bitwise; a structural mismatch (a missing norm, a wrong scale) is >= 1e-3.
K_VERIFY = 8


def _verify(model, arch: Arch, cut: int) -> tuple[float, float]:
    """(max |adapter - model| logits on a short fixed sequence, also through the cut; the noise floor), both
    relative to the logits' scale; (inf, floor) if the adapter fails."""
    was_training = model.training
    model.eval()  # no dropout draws: the global RNG (and so every later dropout mask) is left untouched
    try:
        ids = mx.array([[(7 * i + 3) % 17 + 1 for i in range(16)]], dtype=mx.int32)
        other = mx.array([[(5 * i + 1) % 13 + 2 for i in range(16)]], dtype=mx.int32)
        ref = model(ids)
        scale = max(1.0, mx.abs(ref).max().item())
        in_batch = model(mx.concatenate([other, ids]))[1:]
        longer = model(mx.concatenate([ids, other], axis=1))[:, :16]
        floor = max(mx.abs(ref - in_batch).max().item(), mx.abs(ref - longer).max().item()) / scale
        floor = max(floor, 4 * mx.finfo(ref.dtype).eps)
        try:
            ours = arch_logits(model, arch, ids)
            n = len(arch.blocks(model))
            h = run_blocks(model, arch, arch.embed(model, ids), 0, cut)
            split = arch.head(model, arch.norm(model, run_blocks(model, arch, h, cut, n)))
        except Exception:  # noqa: BLE001  (any structural mismatch means: do not use the adapter)
            return float("inf"), floor
        return max(mx.abs(ref - ours).max().item(), mx.abs(ref - split).max().item()) / scale, floor
    finally:
        model.train(was_training)


def compile_enabled() -> bool:
    # MLX disables compile whenever the variable exists (even "=0"); finetune sets it on import.
    return "MLX_DISABLE_COMPILE" not in os.environ


def cache_bytes_estimate(model, arch: Arch, datasets: Sequence, max_seq_length: int) -> int:
    """Bytes the cached block inputs would take for these datasets (one hidden vector per input position)."""
    probe = arch.embed(model, mx.array([[1]], dtype=mx.int32))
    positions = sum(max(0, min(len(ids), max_seq_length) - 1) for ds in datasets for ids, _ in ds)
    return positions * probe.shape[-1] * probe.dtype.size


def plan(
    model,
    cfg=None,
    *,
    datasets: Sequence = (),
    max_seq_length: int | None = None,
    cache_budget_bytes: int = 2 << 30,
    chunk_bytes: int = 256 << 20,
    enable: Sequence[str] = ("prefix", "loss_positions", "trim"),
) -> Plan:
    """Decide which shortcuts are exact for `model` as prepared for training (adapters attached, base frozen).

    The decision reads the live model (which parameters are trainable, where dropout is), not the config,
    so it stays right for LoRA keys, DoRA, full fine-tuning or frozen layers. `cfg` (a RunConfig) only adds
    context: grad checkpointing and max_seq_length. `datasets` (TokenDatasets that will be cached) let it
    check the cache against `cache_budget_bytes`.
    """
    arch = arch_of(model)
    blocks = arch.blocks(model) if arch else getattr(model, "layers", [])
    p = Plan(arch=arch.name if arch else None, n_blocks=len(blocks), chunk_bytes=chunk_bytes)
    if max_seq_length is None and cfg is not None:
        max_seq_length = cfg.data.max_seq_length
    if not _usable(model, arch, p):
        return p
    cut, why_no_prefix, random_ = _first_changing_block(model, arch, blocks)
    if cut == len(blocks):  # only the final norm / head trains: the whole stack is a fixed prefix
        p.notes.append("no block is trainable: every block is part of the cached prefix")
    if not _self_check(model, arch, cut, p):
        return p
    length_dep = _length_dependent(model)
    if length_dep and why_no_prefix is None:
        why_no_prefix = f"{', '.join(length_dep)} depends on the sequence length (rows cached unpadded)"
    if "prefix" in enable:
        sized = datasets and not why_no_prefix  # the cache is sized only when it could be used
        need = cache_bytes_estimate(model, arch, datasets, max_seq_length or 1 << 30) if sized else 0
        _plan_prefix(p, cut, why_no_prefix, need, cache_budget_bytes, datasets)
        if p.prefix and random_ and min(random_) == cut and not _has_trainable(blocks[cut]):
            p.notes.append(f"cut at block {cut}: first block with active dropout")
        if p.prefix and cfg is not None and getattr(cfg.training, "grad_checkpoint", False):
            p.notes.append("grad checkpointing applies to blocks above the cut; cached blocks need none")
    if "loss_positions" in enable:
        _plan_loss_positions(p, _has_dropout(arch.head_module(model)), datasets)
    if "trim" in enable:
        _plan_trim(p, _has_dropout(model), length_dep)
    return p


def _usable(model, arch: Arch | None, p: Plan) -> bool:
    """Whether any shortcut can apply at all (a known architecture, as it expects, with something to train)."""
    if arch is None:
        p.notes.append(f"not used: unknown architecture {type(model).__module__} (no exact adapter)")
    elif (why := arch.check(model)) is not None:
        p.notes.append(f"not used: {why}")
    elif not _has_trainable(model):
        p.notes.append("not used: nothing is trainable")
    else:
        return True
    return False


def _first_changing_block(model, arch: Arch, blocks) -> tuple[int, str | None, list[int]]:
    """(the cut: the first block whose output can change between steps, why nothing can be cached or None,
    the blocks with active dropout)."""
    adapted = [i for i, b in enumerate(blocks) if _has_trainable(b)]
    random_ = [i for i, b in enumerate(blocks) if _has_dropout(b)]
    if any(_has_trainable(m) or _has_dropout(m) for m in arch.pre_block(model)):
        return 0, "the embedding is trainable (full fine-tuning or adapters on embeddings)", random_
    cut = min(adapted + random_ + [len(blocks)])
    if cut == 0:
        why = "block 0 has adapters (every block adapted)" if 0 in adapted else "block 0 has active dropout"
        return 0, why, random_
    return cut, None, random_


def _self_check(model, arch: Arch, cut: int, p: Plan) -> bool:
    diff, floor = _verify(model, arch, cut)
    if not diff <= K_VERIFY * floor:
        p.notes.append(
            f"not used: the {arch.name} adapter does not reproduce this model's logits (rel diff {diff:.3g} > "
            f"{K_VERIFY} x noise floor {floor:.2g})"
        )
        return False
    p.notes.append(
        f"{arch.name} adapter checked against model(ids): rel diff {diff:.2g} (noise floor {floor:.2g})"
    )
    return True


def _plan_prefix(p: Plan, cut: int, why_not: str | None, need: int, budget: int, datasets: Sequence) -> None:
    if why_not:
        p.notes.append(f"no cached prefix: {why_not}")
    elif need > budget:
        p.notes.append(
            f"no cached prefix: it would take {need / 2**20:.0f} MiB > budget {budget / 2**20:.0f} MiB"
        )
    else:
        p.cut = cut
        if datasets:
            p.notes.append(
                f"prefix cache ~{need / 2**20:.1f} MiB for {sum(len(d) for d in datasets)} examples"
            )


# Dropout masks are drawn for the shape they are applied to: anything that changes that shape (fewer columns,
# gathered rows) would draw different masks than the plain path, so it must not apply there.
def _plan_loss_positions(p: Plan, head_has_dropout: bool, datasets: Sequence) -> None:
    if head_has_dropout:
        p.notes.append("no loss-positions head: the head has active dropout (adapter on the LM head)")
        return
    p.loss_positions = True
    if datasets:
        total = sum(max(0, len(m) - 1) for ds in datasets for _, m in ds)
        hit = sum(sum(1 for w in m[1:] if w) for ds in datasets for _, m in ds)
        p.notes.append(
            f"loss positions: {hit} of {total} real target positions ({100 * hit / max(total, 1):.0f}%)"
        )


def _plan_trim(p: Plan, has_dropout: bool, length_dep: list[str]) -> None:
    if has_dropout:
        p.notes.append("no trimming: active dropout draws masks of the batch's shape (LoRA dropout > 0)")
    elif length_dep:
        p.notes.append(f"no trimming: {', '.join(length_dep)} depends on the sequence length")
    else:
        # With compile on, every new width recompiles the step, so keep mlx-lm's 32-token buckets then.
        p.trim = 1 if not compile_enabled() else PAD_TO
