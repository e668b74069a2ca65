"""Data-parallel LoRA on mx.distributed, inside one rank: its shard of every global batch, exact against one rank.

mlx-lm's train() already averages gradients across the world (average_gradients: packed all_sums divided by
the world size) and all-sums the reported losses. What makes N ranks equal one rank with the same global
batch is the denominator: every rank divides its shard's loss SUM by the global batch's token count (every
rank knows it: the batch order is a pure function of seed and step) and multiplies by N, so mlx-lm's average
is the one-rank mean over all the batch's targets. The shortcuts (prefix cache, loss positions, trimming)
work on each shard's own rows, unchanged. Rank 0 alone writes; every rank checks, before step 1, that it runs
the same code, config, data and model as rank 0 (finetune.train.ranks starts and supervises local ranks).
"""

from __future__ import annotations

import contextlib
import json
import os
import sys
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from finetune.data.tokens import batch_width
from finetune.system.hashing import dir_manifest, file_sha256, json_sha256, mlx_measurement_versions

BEAT = "\x1eFT-RANK"  # a rank's heartbeat line on its stdout, read by the supervisor (finetune.train.ranks)
SUPERVISED = "FT_RANK_SUPERVISED"  # set by finetune.train.ranks for the ranks it starts
LAUNCH_ENV = ("MLX_RANK", "MLX_HOSTFILE", "MLX_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE", "MLX_JACCL_COORDINATOR")


class RankMismatch(RuntimeError):
    """A rank runs other code, config, data or model than rank 0."""


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1
    group: Any = None

    @property
    def writer(self) -> bool:
        return self.rank == 0

    @property
    def sharded(self) -> bool:
        return self.size > 1


SINGLE = World()


def launched() -> bool:
    """This process was started as a rank (mlx.launch, mpirun, or finetune.train.ranks)."""
    return any(os.environ.get(k) for k in LAUNCH_ENV)


def join(backend: str = "any") -> World:
    """The world this process was launched into (size 1 when it was not)."""
    if not launched():
        return SINGLE
    try:
        group = mx.distributed.init(strict=True, backend=backend)
    except RuntimeError as exc:
        if not expects_peers():  # e.g. mlx.launch -n 1: no hostfile, a world of one
            return SINGLE
        raise RuntimeError(f"started as rank {os.environ.get('MLX_RANK', '?')} of a data-parallel world, but MLX "
                           f"could not join it ({exc}): check the hostfile and the backend") from exc  # fmt: skip
    return World(group.rank(), group.size(), group)


def expects_peers() -> bool:
    """The launcher said this world has more than one rank."""
    sizes = (os.environ.get(k, "1") for k in ("MLX_WORLD_SIZE", "OMPI_COMM_WORLD_SIZE"))
    return bool(os.environ.get("MLX_HOSTFILE") or os.environ.get("MLX_JACCL_COORDINATOR")) or any(
        int(v) > 1 for v in sizes if v.isdigit()
    )


def beat(world: World, what: str) -> None:
    """Tell FineTune's supervisor (finetune.train.ranks) this rank is alive and where it is; under another
    launcher nobody reads it."""
    if world.sharded and os.environ.get(SUPERVISED):
        print(f"{BEAT} {world.rank} {what}", file=sys.stdout, flush=True)


# ---------------------------------------------------------------- the job, from rank 0 to every rank


def broadcast_bytes(world: World, payload: bytes | None) -> bytes:
    """Rank 0's bytes on every rank (an all_sum to which the others add zeros)."""
    mine = len(payload) if world.writer and payload is not None else 0
    n = int(mx.distributed.all_sum(mx.array(mine, mx.int32), group=world.group, stream=mx.cpu).item())
    if n == 0:
        return b""
    buf = np.frombuffer(payload, np.uint8) if world.writer else np.zeros(n, np.uint8)
    out = mx.distributed.all_sum(mx.array(buf), group=world.group, stream=mx.cpu)
    return bytes(np.asarray(out, np.uint8))


def send_job(world: World, cfg: Any, checkpoint: Path | None) -> None:
    """Rank 0 tells every rank what to train (the config) and from where (the checkpoint's files): a rank on
    another machine has neither (finetune.train.follower)."""
    files = {p.name: p.read_bytes().hex() for p in sorted(checkpoint.iterdir())} if checkpoint else {}
    job = {"config": cfg.model_dump(mode="json"), "checkpoint": checkpoint.name if checkpoint else None,
           "files": files}  # fmt: skip
    broadcast_bytes(world, json.dumps(job).encode())
    _job["sent"] = True


def receive_job(world: World) -> dict | None:
    """The job rank 0 sent, or None when rank 0 had nothing to train (its training was done, or failed)."""
    raw = broadcast_bytes(world, None)
    return json.loads(raw) if raw else None


_job = {"sent": False}


@contextlib.contextmanager
def leading(world: World) -> Iterator[None]:
    """Around rank 0's whole command: if it never sent a job (its training was cached, or a stage before it
    failed), the waiting ranks are told there is nothing to train instead of waiting for ever."""
    _job["sent"] = False
    try:
        yield
    finally:
        if world.sharded and world.writer and not _job["sent"]:
            broadcast_bytes(world, None)


# ---------------------------------------------------------------- batches and loss


def shard(rows: Sequence, world: World) -> list:
    """This rank's rows of a global batch: every N-th, from its rank (uneven when N does not divide B)."""
    return list(rows[world.rank :: world.size])


def target_count(rows: Sequence[tuple[Sequence[int], Sequence[int]]], max_seq_length: int) -> float:
    """Targets with loss weight in the whole global batch, exactly as one rank's packed batch counts them."""
    width = batch_width(max(len(ids) for ids, _ in rows), max_seq_length)
    return float(sum(float(np.sum(np.asarray(mask[1:width], np.float32))) for _, mask in rows))


def sharded_loss(loss: Callable, world: World) -> Callable:
    """loss(model, *batch, global_targets): the shard's loss sum over the global count, times N (mlx-lm's
    gradient and loss averages divide by N again), and the shard's own token count for tokens/s."""

    def fn(model, *batch):
        *inner, global_targets = batch
        value, toks = loss(model, *inner)
        total = mx.where(toks > 0, value * toks, 0.0)  # a shard with no targets adds nothing
        return total * (world.size / global_targets), toks

    return fn


def shard_batches(iterate: Callable, world: World) -> Callable:
    """An iterate_batches whose training batches are this rank's shard plus the global target count, and whose
    evaluation batches are every N-th batch (mlx-lm's evaluate all-sums loss x tokens and tokens: exact)."""
    if not world.sharded:
        return iterate

    def iterate_batches(dataset, batch_size, max_seq_length, loop=False, **kw):
        if not loop:
            for i, batch in enumerate(iterate(dataset, batch_size, max_seq_length, loop=False, **kw)):
                if i % world.size == world.rank:
                    yield batch
            return
        yield from iterate(dataset, batch_size, max_seq_length, loop=True, **kw)

    return iterate_batches


def shard_build(build: Callable, world: World) -> Callable:
    """build(rows, max_seq_length) for a training batch: this rank's rows, then the global target count."""
    if not world.sharded:
        return build

    def fn(rows, max_seq_length):
        count = target_count(rows, max_seq_length)
        return (*build(shard(rows, world), max_seq_length), mx.array(count, mx.float32))

    return fn


# ---------------------------------------------------------------- one code, config, data and model


def run_digest(cfg: Any, model_path: Path, data_dir: Path) -> dict[str, str]:
    """What must be identical on every rank, each part hashed by content."""
    settings = cfg.model_dump(mode="json")
    data = [Path(data_dir) / f"{n}.jsonl" for n in ("train", "valid")]
    return {
        "code and MLX": json_sha256(mlx_measurement_versions()),
        "config": json_sha256({k: settings[k] for k in ("model", "data", "lora", "training")}),
        "data": json_sha256([file_sha256(p) for p in data if p.is_file()]),
        "model": json_sha256(dir_manifest(model_path)),
    }


def agree(world: World, parts: dict[str, str]) -> None:
    """Every rank compares its digests with every other's (one all_gather); a rank that differs is named."""
    if not world.sharded:
        return
    mine = np.frombuffer(b"".join(bytes.fromhex(v) for v in parts.values()), np.uint8)
    every = mx.distributed.all_gather(mx.array(mine), group=world.group, stream=mx.cpu)
    table = np.asarray(every).reshape(world.size, len(parts), 32)
    for r in range(1, world.size):
        differ = [name for i, name in enumerate(parts) if not np.array_equal(table[r, i], table[0, i])]
        if differ:
            raise RankMismatch(f"rank {r} runs another {', '.join(differ)} than rank 0: every rank must start "
                               "from the same FineTune, config, train/valid.jsonl and model files")  # fmt: skip


def stop_requested(world: World, mine: bool) -> bool:
    """Whether any rank was asked to stop: all ranks then stop at the same step boundary."""
    if not world.sharded:
        return mine
    flag = mx.distributed.all_sum(mx.array(1.0 if mine else 0.0), group=world.group, stream=mx.cpu)
    return float(flag.item()) > 0
