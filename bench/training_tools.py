"""One run of each tool for the training section (bench/training.py says what is measured and runs the rounds):
the data every tool reads, prepared once per setting, and one child process per run, its output read into a Run."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import yaml

from bench.training_runs import (
    LOOP_START,
    PEAK_LINE,
    SHORTCUTS_OFF,
    Run,
    Settings,
    batch_widths,
    completion_row,
    epoch_steps,
    loss_token_check,
    parse_marker,
    parse_mlx_lm_line,
    parse_mlx_lm_val,
    prefix_seconds,
    read_metrics,
    step_gflop,
)
from finetune.data.tokens import tokenize_example

VERBATIM_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def stream(
    cmd: list[str], env: dict[str, str], log_path: Path, timeout: float, on_line=None
) -> tuple[int, int | None]:
    """Run cmd, copy its output to log_path and call on_line(line, arrival_time) per line.

    Returns (exit code, the child's peak RSS in bytes from os.wait4)."""
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(
            cmd,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            env=env,
            bufsize=1,
            errors="replace",
        )
        timer = threading.Timer(timeout, proc.kill)
        timer.start()
        try:
            for line in proc.stdout:
                now = time.time()
                log.write(line)
                if on_line:
                    on_line(line, now)
            proc.stdout.close()
            _, status, usage = os.wait4(proc.pid, 0)
            proc.returncode = os.waitstatus_to_exitcode(status)
            return proc.returncode, usage.ru_maxrss * 1024  # Linux reports KiB
        finally:
            timer.cancel()
            if proc.returncode is None:
                proc.kill()
                proc.wait()


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return ""


def child_env() -> dict[str, str]:
    """The parent's environment (finetune's BLAS/thread defaults included), unbuffered, OpenBLAS preloaded."""
    from finetune.system import blas

    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    st = blas.status()
    if st is not None and st.loaded and st.library:
        env["LD_PRELOAD"] = st.library
    return env


def finetune_cmd() -> list[str]:
    script = Path(sys.executable).parent / "finetune"
    return [str(script)] if script.exists() else [sys.executable, "-m", "finetune.cli"]


def _sha(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# ---------------------------------------------------------------- one run per tool


def run_finetune(st: Settings, work: Path, rnd: int, timeout: float, shortcuts: bool = True) -> Run:
    tool = "finetune" if shortcuts else "finetune_off"
    run_dir, log = work / f"{tool}-r{rnd}", work / f"{tool}-r{rnd}.log"
    shutil.rmtree(run_dir, ignore_errors=True)  # a run directory owns its config: always start afresh
    schedule = [
        f"training.iters={st.iters}",
        f"training.eval_every={st.iters}",
        f"training.save_every={st.iters + 1000}",
    ]
    sets = [*st.overrides, *schedule, *(() if shortcuts else SHORTCUTS_OFF)]
    cmd = finetune_cmd() + ["train", "-p", st.profile, "--run-dir", str(run_dir)]
    for s in sets:
        cmd += ["--set", s]
    run = Run(tool, rnd, st.key)
    tic = time.time()
    code, run.rss_bytes = stream(cmd, child_env(), log, timeout)
    run.wall_s = time.time() - tic
    if code != 0:
        run.error = f"exit {code}: {_tail(log)}"
        return run
    m = read_metrics(run_dir / "metrics.jsonl")
    run.times, run.internal_tps, run.losses = m["times"], m["tps"], m["losses"]
    result = json.loads((run_dir / "train_result.json").read_text())
    note = (result.get("extra") or {}).get("shortcuts") or ""
    run.loop_s = result["wall_time_s"] - sum(m["val_times"])
    run.one_off_s = prefix_seconds(note)
    run.peak_bytes = result.get("peak_memory_bytes")
    run.extra = {
        "train_sha256": _sha(run_dir / "data" / "train.jsonl"),
        "shortcuts": note,
        "wall_time_s": result["wall_time_s"],
        "val_s": sum(m["val_times"]),
    }
    return run


def mlx_lm_config(
    st: Settings, data_dir: Path, adapter_dir: Path, model_path: str | None = None
) -> dict[str, Any]:
    lora = {"rank": st.rank, "scale": st.scale, "dropout": st.dropout}
    if st.keys:
        lora["keys"] = list(st.keys)
    never = st.iters + 1000  # no evaluation or checkpoint inside the timed loop
    return {
        "model": model_path or st.model_path,
        "train": True,
        "data": str(data_dir),
        "fine_tune_type": "lora",
        "optimizer": "adam",
        "seed": st.seed,
        "num_layers": st.num_layers,
        "batch_size": st.batch_size,
        "iters": st.iters,
        "val_batches": 1,
        "learning_rate": st.learning_rate,
        "steps_per_report": 1,
        "steps_per_eval": never,
        "save_every": never,
        "adapter_path": str(adapter_dir),
        "max_seq_length": st.max_seq_length,
        "grad_checkpoint": False,
        "lora_parameters": lora,
        "mask_prompt": st.mask_prompt,
        "test": False,
    }


def run_mlx_lm(st: Settings, work: Path, data_dir: Path, model_path: str, rnd: int, timeout: float) -> Run:
    cfg_path = work / f"mlx_lm-r{rnd}.yaml"
    cfg_path.write_text(
        yaml.safe_dump(mlx_lm_config(st, data_dir, work / f"mlx_lm-r{rnd}-adapters", model_path))
    )
    run, log = Run("mlx_lm", rnd, st.key), work / f"mlx_lm-r{rnd}.log"
    marks: dict[str, float] = {}
    val_s: list[float] = []

    def on_line(line: str, now: float) -> None:
        parsed = parse_mlx_lm_line(line)
        if parsed:
            run.times.append(now)
            run.losses.append(parsed[1])
            run.internal_tps.append(parsed[2])
            return
        val = parse_mlx_lm_val(line)
        if val is not None:
            val_s.append(val)
        for name in (LOOP_START, PEAK_LINE):
            value = parse_marker(line, name)
            if value is not None:
                marks[name] = value

    tic = time.time()
    cmd = [sys.executable, "-m", "bench.mlx_lm_child", "-c", str(cfg_path)]
    code, run.rss_bytes = stream(cmd, child_env(), log, timeout, on_line)
    run.wall_s = time.time() - tic
    if code != 0 or len(run.times) < st.iters:
        run.error = f"exit {code}, {len(run.times)}/{st.iters} step lines parsed: {_tail(log)}"
        return run
    if LOOP_START in marks:
        run.loop_s = run.times[-1] - marks[LOOP_START] - sum(val_s)
    run.peak_bytes = int(marks[PEAK_LINE]) if PEAK_LINE in marks else None
    run.extra = {"val_s": sum(val_s)}
    return run


def peft_args(st: Settings, examples: Path) -> list[str]:
    """bench/peft_child.py's command line for one setting."""
    options = {
        "--model": st.model_path,
        "--examples": examples,
        "--iters": st.iters,
        "--batch-size": st.batch_size,
        "--rank": st.rank,
        "--scale": st.scale,
        "--dropout": st.dropout,
        "--num-layers": st.num_layers,
        "--keys": ",".join(st.keys or []),
        "--lr": st.learning_rate,
        "--max-seq-length": st.max_seq_length,
        "--seed": st.seed,
        "--threads": st.peft_threads,
    }
    return [arg for name, value in options.items() for arg in (name, str(value))]


def run_peft(st: Settings, work: Path, examples: Path, rnd: int, timeout: float) -> Run:
    cmd = [sys.executable, "-m", "bench.peft_child", *peft_args(st, examples)]
    run, log = Run("peft", rnd, st.key), work / f"peft-r{rnd}.log"
    lines: list[str] = []
    tic = time.time()
    code, run.rss_bytes = stream(
        cmd, child_env() | {"LD_PRELOAD": ""}, log, timeout, lambda line, _t: lines.append(line)
    )
    run.wall_s = time.time() - tic
    result = next((json.loads(x) for x in reversed(lines) if x.startswith("{")), None)
    if code != 0 or result is None:
        run.error = f"exit {code}: {_tail(log)}"
        return run
    run.times, run.losses = result.pop("times"), result.pop("losses")
    run.loop_s = run.times[-1] - result["loop_start"] if run.times else None
    run.peak_bytes = result.get("peak_rss_bytes")
    run.extra = {
        k: result.get(k)
        for k in ("threads", "torch", "trainable_params", "startup_s", "shapes", "loss_tokens")
    }
    return run


# ---------------------------------------------------------------- data, once per setting


def verbatim_model(src: Path, dst: Path) -> Path:
    """A folder of symlinks to src whose chat template renders message contents verbatim (for mlx-lm)."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.name == "tokenizer_config.json":
            cfg = json.loads(f.read_text(encoding="utf-8"))
            (dst / f.name).write_text(
                json.dumps({**cfg, "chat_template": VERBATIM_TEMPLATE}), encoding="utf-8"
            )
        elif f.name != "chat_template.jinja":
            (dst / f.name).symlink_to(f.resolve())
    (dst / "chat_template.jinja").write_text(VERBATIM_TEMPLATE, encoding="utf-8")
    return dst


def mlx_lm_items(model_path: Path, data_dir: Path, mask_prompt: bool) -> list[tuple[list[int], int]]:
    """(ids, offset) per training row as mlx-lm's own dataset classes build them."""
    from mlx_lm.tuner.datasets import create_dataset
    from mlx_lm.utils import load_tokenizer

    tok = load_tokenizer(model_path)
    ds = create_dataset(_jsonl_rows(data_dir / "train.jsonl"), tok, SimpleNamespace(mask_prompt=mask_prompt))
    return [tuple(ds.process(ds[i])) for i in range(len(ds))]


def _jsonl_rows(path: Path) -> list[dict[str, Any]]:
    return [json.loads(x) for x in path.read_text(encoding="utf-8").splitlines() if x.strip()]


def finetune_items(
    tok, data_dir: Path, max_seq_length: int, mask_prompt: bool
) -> list[tuple[list[int], list[int]]]:
    """(ids, loss mask) per training row as FineTune trains them; peft trains on the same."""
    items = []
    for row in _jsonl_rows(data_dir / "train.jsonl"):
        spans = row.get("train_spans") or []
        ids, mask = tokenize_example(tok, row["text"], spans, max_seq_length, mask_prompt)
        if sum(mask[1:]):  # as finetune.train.splits.load_split: rows with nothing to learn are dropped
            items.append((ids, mask))
    return items


def write_completion_rows(data_dir: Path, out: Path) -> Path:
    """data_dir's splits as mlx-lm prompt/completion rows, cut where the first train span starts."""
    out.mkdir(parents=True, exist_ok=True)
    for split in ("train", "valid"):
        src = data_dir / f"{split}.jsonl"
        if src.exists():
            rows = [completion_row(row) for row in _jsonl_rows(src)]
            (out / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return out


def prepare(key: str, model_spec: str, profile: str, work: Path, overrides: list[str]) -> dict[str, Any]:
    """Resolve the model, prepare the profile's data once, tokenize it for peft and write mlx-lm's data."""
    from finetune.config.loader import load_config
    from finetune.data.prepare import prepare_for_run
    from finetune.models.resolve import resolve_model
    from finetune.models.tokenizer import load_tokenizer

    cfg = load_config(profile, None, overrides)
    model_path = Path(resolve_model(model_spec).path)
    tok = load_tokenizer(model_path)
    data_dir = work / "data"
    prepare_for_run(cfg.data, data_dir, tok)
    mask = cfg.data.mask_prompt
    items = finetune_items(tok, data_dir, cfg.data.max_seq_length, mask)
    examples = work / "examples.json"
    examples.write_text(json.dumps({"ids": [i for i, _ in items], "masks": [m for _, m in items]}))
    mlx_data, mlx_model = data_dir, model_path
    if mask:  # mlx-lm masks prompts only for prompt/completion or chat rows
        mlx_data = write_completion_rows(data_dir, work / "mlx_lm_data")
        mlx_model = verbatim_model(model_path, work / "mlx_lm_model")
    lengths = [len(i) for i, _ in items]
    b, msl = cfg.training.batch_size, cfg.data.max_seq_length
    mlx_items = mlx_lm_items(mlx_model, mlx_data, mask)
    mlx_lengths = [len(i) for i, _ in mlx_items]
    data = {
        "source": cfg.data.source,
        "examples": len(items),
        "min_length": min(lengths),
        "max_length": max(lengths),
        "mean_length": sum(lengths) / len(lengths),
        "widths": sorted(batch_widths(lengths, b, msl)),
        "widths_mlx_lm": sorted(batch_widths(mlx_lengths, b, msl)),
        "epoch_steps": epoch_steps(len(items), b),
        "train_sha256": _sha(data_dir / "train.jsonl"),
        "loss_tokens": loss_token_check(items, mlx_items, msl),
    }
    mc = json.loads((model_path / "config.json").read_text())
    adapted = mc["num_hidden_layers"] if cfg.lora.num_layers == -1 else cfg.lora.num_layers
    data["step_gflop"] = step_gflop(mc, b, max(data["widths"]), adapted)
    data["vocab_size"] = mc["vocab_size"]
    return {
        "cfg": cfg,
        "model_path": model_path,
        "data": data,
        "examples": examples,
        "mlx_data": mlx_data,
        "mlx_model": str(mlx_model),
        "n_layers": mc["num_hidden_layers"],
    }
