"""Measure MLX's peak training memory for one configuration, in its own process, and LoRA vs full
fine-tuning for a run (or the estimate, labelled so, when full fine-tuning would not fit).

Peaks must not leak between LoRA and full fine-tuning, so each measurement is a fresh
`python -m finetune.train.peak_memory ...` whose last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import finetune  # noqa: F401  (loads the fast BLAS before mlx)
from finetune.models.cache import cache_root
from finetune.system.atomic import atomic_write_json
from finetune.system.beside import beside
from finetune.system.hashing import dir_sha256, file_sha256, json_sha256, mlx_measurement_versions
from finetune.system.mlx_peak import reset_peak
from finetune.system.procs import spawn_guarded, stop_group

PROBE_STEPS = 3  # training steps a probe measures


def measure(
    cfg_path: Path, model_path: Path, data_dir: Path, fine_tune_type: str, steps: int = PROBE_STEPS
) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm import load

    from finetune.config.loader import load_file
    from finetune.train import batches, distributed, shortcuts
    from finetune.train.setup import make_optimizer, prepare_model
    from finetune.train.shortcut_plan import enabled_shortcuts
    from finetune.train.splits import load_split

    cfg = load_file(cfg_path)
    cfg.training.fine_tune_type = fine_tune_type
    mx.random.seed(cfg.training.seed)
    model, tokenizer = load(str(model_path))
    prepare_model(model, cfg)
    optimizer = make_optimizer(cfg)
    data = load_split(
        Path(data_dir) / "train.jsonl", tokenizer, cfg.data.max_seq_length, cfg.data.mask_prompt
    )
    # As FineTune trains: with the exact shortcuts the run's config enables (their cache is part of the cost).
    fast = shortcuts.setup(
        model,
        seed=cfg.training.seed,
        max_seq_length=cfg.data.max_seq_length,
        train_set=data,
        cfg=cfg,
        enable=enabled_shortcuts(cfg),
    )
    # The batch of the longest rows sets a run's peak (every epoch trains it); a data-parallel run's rank 0
    # trains its share of it (finetune.train.distributed.shard).
    rank0 = distributed.World(0, cfg.training.ranks)
    picked = distributed.shard(batches.longest_batch(data, cfg.training.batch_size), rank0)
    batch = shortcuts.build_batch([data[j] for j in picked], cfg.data.max_seq_length, fast.plan, fast.cache)
    value_and_grad = nn.value_and_grad(model, fast.loss)
    mx.eval(model.parameters())
    mx.clear_cache()
    reset_peak()
    losses = []
    for _ in range(steps):
        (loss, _ntoks), grads = value_and_grad(model, *batch)
        optimizer.update(model, grads)
        del grads  # held here, every gradient would stay alive through the eval (not so in train())
        mx.eval(model.parameters(), optimizer.state, loss)
        losses.append(loss.item())
    trainable = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
    return {
        "fine_tune_type": fine_tune_type,
        "peak_bytes": int(mx.get_peak_memory()),
        "batch_shape": list(batch[0].shape),
        "shortcuts": fast.plan.summary(),
        "trainable_params": int(trainable),
        "losses": losses,
    }


def measure_in_subprocesses(
    cfg_path: Path,
    model_path: Path,
    data_dir: Path,
    kinds: Sequence[str],
    steps: int = PROBE_STEPS,
    timeout: float = 600,
    poll: Callable[[], None] = lambda: time.sleep(0.1),
) -> dict[str, dict]:
    """One probe process per kind, all at once; their outputs go to files (no pipe to fill). Any exception here,
    a signal's included, stops every probe before it propagates."""
    args = ["--config", str(cfg_path), "--model", str(model_path), "--data", str(data_dir),
            "--steps", str(steps)]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="finetune-peak-") as tmp:
        procs: dict[str, Any] = {}
        try:
            for kind in kinds:
                out, err = (open(Path(tmp) / f"{kind}.{n}", "w+") for n in ("out", "err"))  # noqa: SIM115
                cmd = [sys.executable, "-m", "finetune.train.peak_memory", *args, "--type", kind]
                procs[kind] = (spawn_guarded(cmd, name="peak-memory", stdout=out, stderr=err,
                                             stdin=subprocess.DEVNULL), out, err)  # fmt: skip
            deadline = time.monotonic() + timeout
            while any(p.poll() is None for p, _, _ in procs.values()):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"memory probes ({', '.join(kinds)}) took over {timeout:g} s")
                poll()
        finally:
            for p, _, _ in procs.values():
                stop_group(p, grace=2)  # reaps the watchdogs; stops what still runs
        return {kind: _result(kind, *entry) for kind, entry in procs.items()}


def _result(kind: str, proc: Any, out: IO[str], err: IO[str]) -> dict:
    out.seek(0), err.seek(0)
    stdout, stderr = out.read(), err.read()
    out.close(), err.close()
    if proc.returncode != 0:
        raise RuntimeError(f"memory probe ({kind}) failed with exit {proc.returncode}: {stderr[-2000:]}")
    return json.loads(stdout.strip().splitlines()[-1])


def measure_in_subprocess(
    cfg_path: Path,
    model_path: Path,
    data_dir: Path,
    fine_tune_type: str,
    steps: int = PROBE_STEPS,
    timeout: float = 600,
) -> dict:
    return measure_in_subprocesses(cfg_path, model_path, data_dir, [fine_tune_type], steps, timeout)[
        fine_tune_type
    ]


@dataclass
class MemoryMeasurement:
    lora_peak: int
    full_peak: int
    source: str  # "measured" or "estimated"
    detail: str


FULL_FIT_MARGIN = 1.5  # measure full fine-tuning only when 1.5x its estimated peak is free


def full_probe_key(model_dir: Path, data_dir: Path, full_cfg: Any, steps: int = PROBE_STEPS) -> str:
    """What full fine-tuning's peak depends on: the model's and training data's bytes, the model/data/training
    settings, this code and the MLX it runs on. Equal keys measure the same thing, so the peak is measured once."""
    settings = full_cfg.model_dump(mode="json", include={"model", "data", "training"})
    return json_sha256({
        "model": dir_sha256(model_dir)[0], "train": file_sha256(Path(data_dir) / "train.jsonl"),
        "settings": settings, "steps": steps, **mlx_measurement_versions(),
    })[:32]  # fmt: skip


@dataclass
class _Plan:
    """What measuring a run's memory needs: its estimates, its probe inputs and the full probe's cache file."""

    est_lora: int
    est_full: int
    cfg_file: Path
    model_dir: Path
    data_dir: Path
    full_cfg: Any
    cache_dir: Path

    def fits_full(self, available: int | None) -> bool:
        return available is not None and self.est_full * FULL_FIT_MARGIN <= available

    def fits_both(self, available: int | None) -> bool:
        """LoRA's work and a full probe at once (two processes, one core each)."""
        both = (self.est_full + self.est_lora) * FULL_FIT_MARGIN
        return available is not None and both <= available and (os.cpu_count() or 1) >= 2

    @functools.cached_property
    def cache(self) -> Path | None:
        """The full probe's file, keyed on demand: a model too large for full fine-tuning is never hashed.
        No training split, nothing to key the probe by: it is measured, not cached."""
        if not (self.data_dir / "train.jsonl").is_file():
            return None
        return self.cache_dir / f"{full_probe_key(self.model_dir, self.data_dir, self.full_cfg)}.json"


def with_type(run: Any, fine_tune_type: str) -> Any:
    """A copy of the run's config that trains fine_tune_type (the full probe's config and its estimate)."""
    training = run.training.model_copy(update={"fine_tune_type": fine_tune_type})
    return run.model_copy(update={"training": training}, deep=True)


def _plan(run_dir: Path, model_dir: Path, model_config: dict, cfg: Any, cache_dir: Path | None) -> _Plan:
    from finetune.data.prepare import read_report
    from finetune.train import memory

    full_cfg, data = with_type(cfg, "full"), read_report(Path(run_dir) / "data")
    return _Plan(
        memory.from_run_config(model_config, cfg, data).total_bytes,
        memory.from_run_config(model_config, full_cfg, data).total_bytes,
        Path(run_dir) / "config.yaml",
        Path(model_dir),
        Path(run_dir) / "data",
        full_cfg,
        cache_dir or cache_root() / "memory",
    )


def measure_memory(
    run_dir: Path,
    model_dir: Path,
    model_config: dict,
    cfg: Any,
    *,
    available: int | None,
    run_peak: int | None = None,
    measure: Callable[..., dict[str, dict]] | None = None,
    cache_dir: Path | None = None,
) -> MemoryMeasurement:
    """LoRA vs full fine-tuning peaks for this run's model, batch and data. LoRA's is the run's own training
    peak (run_peak) when it recorded one, else a probe's. Full's is a probe's, each probe in a fresh process,
    cached by what it depends on (full_probe_key; prefetch_full may have measured it while the run trained);
    when full fine-tuning would not fit, it is estimated (labelled so)."""
    measure = measure or measure_in_subprocesses  # (config, model, data, kinds) -> {kind: probe result}
    plan = _plan(run_dir, model_dir, model_config, cfg, cache_dir)
    notes = [f"estimates were {plan.est_lora / 2**20:.0f} / {plan.est_full / 2**20:.0f} MiB"]
    if run_peak:
        notes.append("LoRA: this run's own training peak")

    def probe(*kinds: str) -> dict[str, int]:
        got = measure(plan.cfg_file, plan.model_dir, plan.data_dir, list(kinds))
        return {k: r["peak_bytes"] for k, r in got.items()}

    if not plan.fits_full(available):
        # The full estimate, scaled down where the estimator over-estimated this run's measured LoRA peak
        # (never up): a LoRA that costs what full fine-tuning would still fails.
        lora = run_peak or probe("lora")["lora"]  # it trained here: it fits
        scale = min(1.0, lora / plan.est_lora) if plan.est_lora else 1.0
        have = "unknown" if available is None else f"{available / 2**30:.1f} GiB"
        why = (
            f"LoRA measured; full fine-tuning needs ~{plan.est_full / 2**30:.1f} GiB, {have} free: not run, "
            f"its estimate x{scale:.2f} (measured / estimated LoRA peak, at most 1)"
        )
        return MemoryMeasurement(lora, int(plan.est_full * scale), "estimated", "; ".join([why, *notes[1:]]))
    if (full := _cached_peak(plan.cache)) is not None:
        notes.append(f"full: measured for the same model, data, settings and code ({plan.cache})")
        peaks = {"lora": run_peak or probe("lora")["lora"], "full": full}
    elif not run_peak and plan.fits_both(available):
        # each probe trains on one BLAS thread: side by side they use the core a sequential probe leaves idle
        # (peaks are per process, so neither sees the other's)
        peaks = probe("lora", "full")
        notes.append("the two probes ran side by side")
    else:
        peaks = {"lora": run_peak or probe("lora")["lora"], **probe("full")}
    _save_peak(plan.cache, peaks["full"])
    # the estimator (which sizes runs and picks tier models) checked against what was measured
    notes.append(f"estimate error: LoRA {plan.est_lora / peaks['lora'] - 1:+.1%}, "
                 f"full {plan.est_full / peaks['full'] - 1:+.1%}")  # fmt: skip
    return MemoryMeasurement(peaks["lora"], peaks["full"], "measured", "; ".join(notes))


class _Cancelled(Exception):
    pass


def prefetch_full(
    run_dir: Path,
    model_dir: Path,
    model_config: dict,
    cfg: Any,
    *,
    available: int | None,
    measure: Callable[..., dict[str, dict]] | None = None,
    cache_dir: Path | None = None,
) -> Callable[[bool], str]:
    """Measure full fine-tuning's peak in the background while the run trains (training uses one core, the
    probe the other), when both fit in memory at once and it was not measured before; the result lands where
    measure_memory looks. Returns finish(cancel) -> what happened: it waits for the probe, or stops it first."""
    plan = _plan(run_dir, model_dir, model_config, cfg, cache_dir)
    if not plan.fits_both(available) or _cached_peak(plan.cache) is not None:
        return lambda cancel=False: "full probe not prefetched (measured before, or no room beside training)"
    measure = measure or measure_in_subprocesses

    def work(stop: threading.Event) -> str:
        def poll() -> None:
            if stop.wait(0.1):
                raise _Cancelled

        try:
            got = measure(plan.cfg_file, plan.model_dir, plan.data_dir, ["full"], poll=poll)
            _save_peak(plan.cache, got["full"]["peak_bytes"])
        except Exception as exc:  # the judge measures it again, and reports a failure there
            return f"full probe not prefetched ({type(exc).__name__}: {str(exc)[:200]})"
        return "full probe prefetched while training"

    return beside(work, "prefetch-full-peak")


def _cached_peak(path: Path | None) -> int | None:
    try:
        peak = json.loads(path.read_text())["full_peak_bytes"] if path else None
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return peak if isinstance(peak, int) and peak > 0 else None


def _save_peak(path: Path | None, peak: int) -> int:
    if path is not None:
        atomic_write_json(path, {"full_peak_bytes": int(peak)})
    return int(peak)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--type", choices=["lora", "dora", "full"], required=True)
    p.add_argument("--steps", type=int, default=PROBE_STEPS)
    a = p.parse_args(argv)
    print(json.dumps(measure(Path(a.config), Path(a.model), Path(a.data), a.type, a.steps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
