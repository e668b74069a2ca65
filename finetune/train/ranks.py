"""Local data-parallel ranks, started and watched by FineTune itself (`training.ranks: N`).

Why not `mlx.launch`: its parent process polls its children's pipes in a busy loop that takes most of a core,
the core the second rank needs (measured: 2 ranks under it ran at 73-83 tokens/s vs 108 for 1 rank). Here the
ranks talk over MLX's ring backend on 127.0.0.1 (the same backend mlx.launch uses), each one a guarded child
(process group, parent-death signal, watchdog, pid file under RUN/pids), and this process waits on their pipes.

The supervisor ends the run, naming the rank and the cause, when a rank dies, or when no rank has reported a
step for `training.rank_timeout_s` (hung, or never connected); every rank is then stopped. A signal to FineTune
is forwarded to rank 0: all ranks stop at one step boundary (finetune.train.distributed.stop_requested), rank 0
checkpointing, and the run ends interrupted with its resume command. Under mlx.launch or mpirun (the world is
the user's) training joins that world in this process.
"""

from __future__ import annotations

import contextlib
import json
import os
import pickle
import queue
import re
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psutil

from finetune.errors import UserError
from finetune.system import procs, signals
from finetune.train import distributed
from finetune.train.checkpoints import RESULT, latest_checkpoint
from finetune.train.result import TrainResult

ENTRY = "finetune.train.rank_main"
STOP_GRACE_S = 5.0  # a rank stopped by the supervisor: SIGTERM, then SIGKILL after this
# After a rank failed the others wait inside a collective with SIGTERM deferred: they are killed sooner (rank 0
# writes checkpoints atomically, so one cut short leaves the previous one intact).
FAILED_GRACE_S = 1.0


class RankFailure(RuntimeError):
    """A rank died, hung or never connected; every rank was stopped."""


# the local ranks' ports, comma-separated (a container's open range); unset: free ones
PORTS_ENV = "FT_RANK_PORTS"


def free_ports(n: int) -> list[int]:
    """n ports for n local ranks on 127.0.0.1: the ones FT_RANK_PORTS names, else free ones."""
    pinned = os.environ.get(PORTS_ENV, "").strip()
    if not pinned:
        return [procs.free_port() for _ in range(n)]
    try:
        ports = [int(p) for p in pinned.split(",")]
    except ValueError:
        ports = []
    if len(ports) != n or not all(0 < p < 65536 for p in ports) or len(set(ports)) != n:
        raise UserError(f"{PORTS_ENV}={pinned!r}: give {n} distinct ports (1-65535), comma-separated, one per "
                        "rank (training.ranks), or unset it to use free ones")  # fmt: skip
    return ports


def local_hostfile(folder: Path, ports: Sequence[int]) -> Path:
    """MLX's ring hostfile for len(ports) ranks on 127.0.0.1, one port each."""
    hosts = folder / "hosts.json"
    hosts.write_text(json.dumps([[f"127.0.0.1:{p}"] for p in ports]))
    return hosts


def rank_env(rank: int, n: int, hostfile: Path) -> dict[str, str]:
    """What makes a process rank `rank` of the ring world in `hostfile` (as mlx.launch sets it)."""
    return {"MLX_RANK": str(rank), "MLX_HOSTFILE": str(hostfile), "MLX_WORLD_SIZE": str(n)}


def data_parallel(train_run: Callable) -> Callable:
    """train_run (finetune.train.engine's) on one rank, on `training.ranks` local ranks, or as a rank of the
    world mlx.launch started this process in."""

    def train(cfg, model_path: Path, data_dir: Path, run_dir: Path, **kw: Any):
        if distributed.launched():
            return train_run(cfg, model_path, data_dir, run_dir, world=distributed.join(), **kw)
        if cfg.training.ranks <= 1:
            return train_run(cfg, model_path, data_dir, run_dir, **kw)
        return train_local_ranks(cfg, model_path, data_dir, run_dir, **kw)

    return train


@dataclass
class _Rank:
    rank: int
    proc: subprocess.Popen
    err: Path
    where: str = "starting"
    seen: float = field(default_factory=time.monotonic)


def train_local_ranks(
    cfg,
    model_path: Path,
    data_dir: Path,
    run_dir: Path,
    *,
    resume: bool = False,
    on_trained: Callable | None = None,
    log: Callable[[str], None] = print,
    ports: Callable[[int], Sequence[int]] = free_ports,
    rank_env: Callable[[int], dict[str, str]] = lambda _rank: {},
    python: str = sys.executable,
):
    """Train on cfg.training.ranks local ranks; returns rank 0's TrainResult (read from RUN/train_result.json)."""
    n, run_dir = cfg.training.ranks, Path(run_dir)
    with tempfile.TemporaryDirectory(prefix="finetune-ranks-") as tmp:
        spec = Path(tmp) / "spec.pkl"
        paths = {k: str(Path(v).resolve()) for k, v in (("model_path", model_path), ("data_dir", data_dir),
                                                         ("run_dir", run_dir))}  # fmt: skip
        job = dict(cfg=cfg, resume=resume, on_trained=on_trained, **paths)
        spec.write_bytes(pickle.dumps(job))
        hosts = local_hostfile(Path(tmp), ports(n))
        log(f"[train] {n} local ranks (MLX ring backend on 127.0.0.1), rank 0 writes {run_dir}")
        lines: queue.Queue = queue.Queue()
        ranks = [_start(r, n, spec, hosts, Path(tmp), run_dir, python, rank_env(r), lines) for r in range(n)]
        try:
            _supervise(ranks, lines, cfg.training.rank_timeout_s, log)
        except signals.Interrupted:
            _forward(ranks, cfg.training.rank_timeout_s)
            raise
        except RankFailure as exc:
            _stop(ranks, FAILED_GRACE_S)
            ckpt = latest_checkpoint(run_dir)
            kept = (
                f"the last checkpoint, {ckpt.name}, is intact: --resume continues from it"
                if ckpt
                else "no checkpoint was written yet"
            )
            raise RankFailure(f"{exc}; every rank was stopped; {kept}") from None
        finally:
            _stop(ranks)
    return TrainResult(**json.loads((run_dir / RESULT).read_text()))


def _start(
    r: int,
    n: int,
    spec: Path,
    hosts: Path,
    tmp: Path,
    run_dir: Path,
    python: str,
    extra: dict,
    lines: queue.Queue,
) -> _Rank:
    env = {**os.environ, **extra, **rank_env(r, n, hosts)}
    env["PYTHONUNBUFFERED"], env[distributed.SUPERVISED] = "1", "1"
    err = tmp / f"rank{r}.err"
    with err.open("wb") as stderr:  # the child keeps its own copy
        proc = procs.spawn_guarded(
            [python, "-m", ENTRY, str(spec)],
            pid_dir=run_dir / procs.PID_DIR,
            name=f"rank{r}",
            env=env,
            cwd=tmp,  # not the caller's folder: `-m` would import a finetune/ found there before the installed one
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
        )
    threading.Thread(target=_read, args=(r, proc.stdout, lines), daemon=True).start()
    return _Rank(r, proc, err)


def _read(r: int, stream, lines: queue.Queue) -> None:
    for line in stream:
        lines.put((r, line.rstrip("\n")))


def _supervise(ranks: list[_Rank], lines: queue.Queue, timeout: float, log: Callable[[str], None]) -> None:
    """Until every rank has exited 0: forward rank 0's lines, track heartbeats, fail on death or silence."""
    while True:
        with contextlib.suppress(queue.Empty):
            r, line = lines.get(timeout=0.2)
            if line.startswith(distributed.BEAT):
                ranks[r].where, ranks[r].seen = line.split(" ", 2)[2], time.monotonic()
            elif r == 0:
                log(line)
            continue
        codes = [k.proc.poll() for k in ranks]
        if all(c == 0 for c in codes):
            return
        for k, code in zip(ranks, codes, strict=True):
            if code not in (None, 0):
                raise RankFailure(f"rank {k.rank} {_death(code, k)} ({_position(k)})")
        quiet = time.monotonic() - max(k.seen for k in ranks)
        if quiet > timeout:
            raise RankFailure(_silence(ranks, timeout))


def _death(code: int, k: _Rank) -> str:
    if code < 0:
        return f"was killed by {signal.Signals(-code).name}"
    lines = [ln.strip() for ln in k.err.read_text(errors="replace").splitlines() if ln.strip()]
    last = lines[-1] if lines else ""  # the exception's own line, its module path dropped
    last = re.sub(r"^(?:\w+\.)+(?=\w+: )", "", last)
    return f"exited with code {code}" + (f": {last}" if last else "")


def _position(k: _Rank) -> str:
    if k.where == "starting":
        return "before it connected"
    return f"last reported: {k.where}"


def _silence(ranks: list[_Rank], timeout: float) -> str:
    """Which rank stalled the world: a stopped process, else one that never connected, else the one furthest
    behind (the others wait for it inside an all_sum)."""
    for k in ranks:
        with contextlib.suppress(psutil.Error):
            if psutil.Process(k.proc.pid).status() == psutil.STATUS_STOPPED:
                return (
                    f"rank {k.rank} hung (stopped) ({_position(k)}); no rank reported a step in {timeout:g} s"
                )
    starting = [k.rank for k in ranks if k.where == "starting"]
    if starting:
        return (f"rank {', '.join(map(str, starting))} could not connect: no word from it in {timeout:g} s "
                "(training.rank_timeout_s)")  # fmt: skip
    behind = min(ranks, key=lambda k: (_step(k.where), -k.seen))
    return f"rank {behind.rank} hung ({_position(behind)}); no rank reported a step in {timeout:g} s"


def _step(where: str) -> int:
    parts = where.split()
    return int(parts[1]) if len(parts) == 2 and parts[1].isdigit() else -1


def _forward(ranks: list[_Rank], timeout: float) -> None:
    """A signal to FineTune: rank 0 gets SIGTERM and every rank stops at the next step boundary (rank 0
    checkpoints); the others get STOP_GRACE_S after rank 0 is gone (stopped before training, they would wait)."""
    with contextlib.suppress(ProcessLookupError):
        ranks[0].proc.send_signal(signal.SIGTERM)
    with contextlib.suppress(subprocess.TimeoutExpired):
        ranks[0].proc.wait(timeout=timeout)
    for k in ranks[1:]:
        with contextlib.suppress(subprocess.TimeoutExpired):
            k.proc.wait(timeout=STOP_GRACE_S)


def _stop(ranks: list[_Rank], grace: float = STOP_GRACE_S) -> None:
    for k in ranks:
        procs.stop_group(k.proc, grace=grace if k.proc.poll() is None else 0.1)
