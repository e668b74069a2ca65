"""Measure MLX's peak training memory for one configuration, in its own process, and LoRA vs full
fine-tuning for a run (or the estimate, labelled so, when full fine-tuning would not fit).

Peaks must not leak between LoRA and full fine-tuning, so each measurement is a fresh
`python -m finetune.train.peak_memory ...` whose last stdout line is JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import finetune  # noqa: F401  (loads the fast BLAS before mlx)
from finetune.system.procs import spawn_guarded, stop_group


def measure(cfg_path: Path, model_path: Path, data_dir: Path, fine_tune_type: str, steps: int = 3) -> dict:
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from mlx_lm import load

    from finetune.config.loader import load_file
    from finetune.train import shortcuts
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
    batch = next(fast.iterate_train(data, cfg.training.batch_size, cfg.data.max_seq_length, loop=True))
    value_and_grad = nn.value_and_grad(model, fast.loss)
    mx.eval(model.parameters())
    mx.clear_cache()
    mx.reset_peak_memory()
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
    steps: int = 3,
    timeout: float = 600,
    poll: Callable[[], None] = lambda: time.sleep(0.1),
) -> dict[str, dict]:
    """One probe process per kind, all at once; their outputs go to files (no pipe to fill). Any exception here,
    a signal's included, stops every probe before it propagates."""
    args = [
        "--config",
        str(cfg_path),
        "--model",
        str(model_path),
        "--data",
        str(data_dir),
        "--steps",
        str(steps),
    ]
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
    steps: int = 3,
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


def measure_memory(
    run_dir: Path,
    model_dir: Path,
    model_config: dict,
    cfg: Any,
    *,
    available: int | None,
    measure: Callable[..., dict[str, dict]] | None = None,
) -> MemoryMeasurement:
    """LoRA vs full fine-tuning peaks for this run's model, batch and data, each in a fresh process (side by side
    when both fit at once); when full fine-tuning would not fit, its peak is estimated (and labelled so) and LoRA's
    is still measured."""
    from finetune.data.prepare import read_report
    from finetune.train import memory

    measure = measure or measure_in_subprocesses  # (config, model, data, kinds) -> {kind: probe result}
    full_cfg, data = cfg.model_copy(deep=True), read_report(Path(run_dir) / "data")
    full_cfg.training.fine_tune_type = "full"
    est_lora = memory.from_run_config(model_config, cfg, data).total_bytes
    est_full = memory.from_run_config(model_config, full_cfg, data).total_bytes
    cfg_file, data_dir = Path(run_dir) / "config.yaml", Path(run_dir) / "data"
    fits_full = available is not None and est_full * FULL_FIT_MARGIN <= available
    estimates = f"estimates were {est_lora / 2**20:.0f} / {est_full / 2**20:.0f} MiB"
    if fits_full and (est_full + est_lora) * FULL_FIT_MARGIN <= available and (os.cpu_count() or 1) >= 2:
        # each probe trains on one BLAS thread: side by side they use the core a sequential probe leaves idle
        # (peaks are per process, so neither sees the other's)
        both = measure(cfg_file, model_dir, data_dir, ["lora", "full"])
        lora, full = both["lora"]["peak_bytes"], both["full"]["peak_bytes"]
        return MemoryMeasurement(lora, full, "measured", f"{estimates}; the two probes ran side by side")
    lora = measure(cfg_file, model_dir, data_dir, ["lora"])["lora"]["peak_bytes"]  # it trained here: it fits
    if not fits_full:
        # The full estimate, scaled down where the estimator over-estimated this run's measured LoRA peak
        # (never up): a LoRA that costs what full fine-tuning would still fails.
        scale = min(1.0, lora / est_lora) if est_lora else 1.0
        full = int(est_full * scale)
        have = "unknown" if available is None else f"{available / 2**30:.1f} GiB"
        why = (
            f"LoRA measured; full fine-tuning needs ~{est_full / 2**30:.1f} GiB, {have} free: not run, its "
            f"estimate x{scale:.2f} (measured / estimated LoRA peak, at most 1)"
        )
        return MemoryMeasurement(lora, full, "estimated", why)
    full = measure(cfg_file, model_dir, data_dir, ["full"])["full"]["peak_bytes"]
    return MemoryMeasurement(lora, full, "measured", estimates)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--config", required=True)
    p.add_argument("--model", required=True)
    p.add_argument("--data", required=True)
    p.add_argument("--type", choices=["lora", "dora", "full"], required=True)
    p.add_argument("--steps", type=int, default=3)
    a = p.parse_args(argv)
    print(json.dumps(measure(Path(a.config), Path(a.model), Path(a.data), a.type, a.steps)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
