"""Runners of the training section (bench/training.py says what is measured): data for every tool, one
child process per run, and the interleaved rounds."""

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

from bench.stats import Section
from bench.training import (
    LOOP_START,
    PEAK_LINE,
    SHORTCUTS_OFF,
    TOOLS,
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
    rotated,
    step_gflop,
    summarize,
)

VERBATIM_TEMPLATE = "{% for message in messages %}{{ message['content'] }}{% endfor %}"


def stream(
    cmd: list[str], env: dict[str, str], log_path: Path, timeout: float, on_line=None
) -> tuple[int, int | None]:
    """Run cmd, copy its output to log_path and call on_line(line, arrival_time) per line.

    Returns (exit code, the child's peak RSS in bytes from os.wait4)."""
    with open(log_path, "w", encoding="utf-8") as log:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                bufsize=1, errors="replace")  # fmt: skip
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
    sets = [*st.overrides, f"training.iters={st.iters}", f"training.eval_every={st.iters}",
            f"training.save_every={st.iters + 1000}", *(() if shortcuts else SHORTCUTS_OFF)]  # fmt: skip
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
    run.extra = {"train_sha256": _sha(run_dir / "data" / "train.jsonl"), "shortcuts": note,
                 "wall_time_s": result["wall_time_s"], "val_s": sum(m["val_times"])}  # fmt: skip
    return run


def mlx_lm_config(
    st: Settings, data_dir: Path, adapter_dir: Path, model_path: str | None = None
) -> dict[str, Any]:
    lora = {"rank": st.rank, "scale": st.scale, "dropout": st.dropout}
    if st.keys:
        lora["keys"] = list(st.keys)
    return {
        "model": model_path or st.model_path, "train": True, "data": str(data_dir), "fine_tune_type": "lora",
        "optimizer": "adam", "seed": st.seed, "num_layers": st.num_layers, "batch_size": st.batch_size,
        "iters": st.iters, "val_batches": 1, "learning_rate": st.learning_rate, "steps_per_report": 1,
        "steps_per_eval": st.iters + 1000, "save_every": st.iters + 1000, "adapter_path": str(adapter_dir),
        "max_seq_length": st.max_seq_length, "grad_checkpoint": False, "lora_parameters": lora,
        "mask_prompt": st.mask_prompt, "test": False,
    }  # fmt: skip


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


def run_peft(st: Settings, work: Path, examples: Path, rnd: int, timeout: float) -> Run:
    cmd = [sys.executable, "-m", "bench.peft_child", "--model", st.model_path, "--examples", str(examples),
           "--iters", str(st.iters), "--batch-size", str(st.batch_size), "--rank", str(st.rank),
           "--scale", str(st.scale), "--dropout", str(st.dropout), "--num-layers", str(st.num_layers),
           "--keys", ",".join(st.keys or []), "--lr", str(st.learning_rate),
           "--max-seq-length", str(st.max_seq_length), "--seed", str(st.seed),
           "--threads", str(st.peft_threads)]  # fmt: skip
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
    rows = [
        json.loads(x)
        for x in (data_dir / "train.jsonl").read_text(encoding="utf-8").splitlines()
        if x.strip()
    ]
    ds = create_dataset(rows, tok, SimpleNamespace(mask_prompt=mask_prompt))
    return [tuple(ds.process(ds[i])) for i in range(len(ds))]


def prepare(key: str, model_spec: str, profile: str, work: Path, overrides: list[str]) -> dict[str, Any]:
    """Resolve the model, prepare the profile's data once, tokenize it for peft and write mlx-lm's data."""
    from finetune.config.loader import load_config
    from finetune.data.prepare import prepare_for_run
    from finetune.data.tokens import tokenize_example
    from finetune.models.resolve import resolve_model
    from finetune.models.tokenizer import load_tokenizer

    cfg = load_config(profile, None, overrides)
    model_path = Path(resolve_model(model_spec).path)
    tok = load_tokenizer(model_path)
    data_dir = work / "data"
    prepare_for_run(cfg.data, data_dir, tok)
    mask = cfg.data.mask_prompt
    items = []
    for line in (data_dir / "train.jsonl").read_text(encoding="utf-8").splitlines():
        row = json.loads(line)
        i, m = tokenize_example(tok, row["text"], row.get("train_spans") or [], cfg.data.max_seq_length, mask)
        if sum(m[1:]):  # as finetune.train.batches.load_split: rows with nothing to learn are dropped
            items.append((i, m))
    examples = work / "examples.json"
    examples.write_text(json.dumps({"ids": [i for i, _ in items], "masks": [m for _, m in items]}))
    mlx_data, mlx_model = data_dir, model_path
    if mask:  # mlx-lm masks prompts only for prompt/completion or chat rows
        mlx_data, mlx_model = work / "mlx_lm_data", verbatim_model(model_path, work / "mlx_lm_model")
        mlx_data.mkdir(parents=True, exist_ok=True)
        for split in ("train", "valid"):
            src = data_dir / f"{split}.jsonl"
            if src.exists():
                rows = [
                    completion_row(json.loads(x))
                    for x in src.read_text(encoding="utf-8").splitlines()
                    if x.strip()
                ]
                (mlx_data / f"{split}.jsonl").write_text(
                    "".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8"
                )
    lengths = [len(i) for i, _ in items]
    b, msl = cfg.training.batch_size, cfg.data.max_seq_length
    mlx_items = mlx_lm_items(mlx_model, mlx_data, mask)
    data = {
        "source": cfg.data.source, "examples": len(items), "min_length": min(lengths), "max_length": max(lengths),
        "mean_length": sum(lengths) / len(lengths), "widths": sorted(batch_widths(lengths, b, msl)),
        "widths_mlx_lm": sorted(batch_widths([len(i) for i, _ in mlx_items], b, msl)),
        "epoch_steps": epoch_steps(len(items), b), "train_sha256": _sha(data_dir / "train.jsonl"),
        "loss_tokens": loss_token_check(items, mlx_items, msl),
    }  # fmt: skip
    mc = json.loads((model_path / "config.json").read_text())
    adapted = mc["num_hidden_layers"] if cfg.lora.num_layers == -1 else cfg.lora.num_layers
    data["step_gflop"] = step_gflop(mc, b, max(data["widths"]), adapted)
    data["vocab_size"] = mc["vocab_size"]
    return {"cfg": cfg, "model_path": model_path, "data": data, "examples": examples, "mlx_data": mlx_data,
            "mlx_model": str(mlx_model), "n_layers": mc["num_hidden_layers"]}  # fmt: skip


def make_settings(key: str, model_spec: str, profile: str, overrides: list[str], p: dict, *, iters: int,
                  warmup: int, rounds: int, peft_threads: int) -> Settings:  # fmt: skip
    cfg = p["cfg"]
    return Settings(
        key=key, model=model_spec, model_path=str(p["model_path"]), profile=profile, overrides=list(overrides),
        mask_prompt=cfg.data.mask_prompt, batch_size=cfg.training.batch_size, max_seq_length=cfg.data.max_seq_length,
        rank=cfg.lora.rank, scale=cfg.lora.scale, dropout=cfg.lora.dropout,
        num_layers=p["n_layers"] if cfg.lora.num_layers == -1 else cfg.lora.num_layers, keys=cfg.lora.keys,
        learning_rate=cfg.training.learning_rate, seed=cfg.training.seed, iters=iters, warmup=warmup, rounds=rounds,
        peft_threads=peft_threads, profile_iters=cfg.training.iters,
    )  # fmt: skip


def run_section(work: Path, *, model_spec: str = "smollm2-135m", profile: str = "quick", iters: int = 8,
                warmup: int = 2, rounds: int = 2, overrides: list[str] = (), release_profile: str = "release",
                release_epochs: int | None = None, release_rounds: int = 1, release_warmup: int = 2,
                peft_threads: int | None = None, matmul_gflops: float | None = None, timeout: float = 900,
                log=print) -> Section:  # fmt: skip
    """Both settings, every tool, round by round: in each round each setting's four tools in rotated order.

    The release setting runs the profile's own steps (120: 6 epochs, as users run it) unless release_epochs
    says how many epochs of its data to run instead."""
    threads = peft_threads or int(os.environ.get("OPENBLAS_NUM_THREADS") or 1)
    base = [f"model.name={model_spec}", *overrides]
    plans = {
        "equal": (profile, [*base[:1], "data.mask_prompt=false", *base[1:]], rounds, warmup),
        "release": (release_profile, base, release_rounds, release_warmup),
    }
    settings, prepared, data = [], {}, {}
    for key, (prof, sets, n_rounds, wu) in plans.items():
        if n_rounds <= 0:
            continue
        (work / key).mkdir(parents=True, exist_ok=True)
        p = prepare(key, model_spec, prof, work / key, sets)
        if key == "equal":
            n_iters = iters
        elif release_epochs:
            n_iters = release_epochs * p["data"]["epoch_steps"]
        else:
            from finetune.config.loader import load_config

            n_iters = load_config(prof, overrides=sets).training.iters
        settings.append(make_settings(key, model_spec, prof, sets, p, iters=n_iters, warmup=wu, rounds=n_rounds,
                                      peft_threads=threads))  # fmt: skip
        p["data"]["matmul_gflops"] = matmul_gflops
        prepared[key], data[key] = p, p["data"]
        log(
            f"  training {key}: {p['data']['examples']} examples, {n_iters} steps per run, {n_rounds} round(s)"
        )
    runs: list[Run] = []
    for rnd in range(max((st.rounds for st in settings), default=0)):
        for st in settings:
            if rnd >= st.rounds:
                continue
            p, w = prepared[st.key], work / st.key
            runners = {
                "finetune": lambda r, st=st, w=w: run_finetune(st, w, r, timeout, shortcuts=True),
                "finetune_off": lambda r, st=st, w=w: run_finetune(st, w, r, timeout, shortcuts=False),
                "mlx_lm": lambda r, st=st, w=w, p=p: run_mlx_lm(
                    st, w, p["mlx_data"], p["mlx_model"], r, timeout
                ),
                "peft": lambda r, st=st, w=w, p=p: run_peft(st, w, p["examples"], r, timeout),
            }
            for tool in rotated(TOOLS, rnd):
                run = runners[tool](rnd)
                log(f"  training {st.key} {tool} round {rnd}: {run.wall_s:.0f} s"
                    + (f" FAILED {run.error[:200]}" if run.error else ""))  # fmt: skip
                runs.append(run)
    s = summarize(settings, runs, data)
    for st in settings:
        shas = {
            r.extra.get("train_sha256") for r in runs if r.setting == st.key and r.extra.get("train_sha256")
        }
        if shas and shas != {data[st.key]["train_sha256"]}:
            s.notes.append(
                f"WARNING ({st.key}): `finetune train` prepared other training data than the other tools saw."
            )
    return s
