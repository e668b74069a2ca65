"""Training throughput, side by side, of four trainers on two settings.

Tools: `finetune train` with its exact training shortcuts on (the default config) and off, the raw
`mlx_lm lora` CLI, and transformers + peft on torch CPU (bench/peft_child.py). Settings:

* equal: the `--profile` (quick) with mask_prompt off, so every position carries loss and every tool
  does the same work per step;
* release: the `release` profile as users run it (mask_prompt on, LoRA on the top 8 blocks, batch 4);
  mlx-lm gets the same token ids as prompt/completion rows so it masks the same prompt tokens, peft gets
  FineTune's own loss masks.

Per run: the step-end times (metrics.jsonl for finetune, mlx-lm's report lines as they arrive, the peft
child's loop), the training loop's wall time without validation, any one-off cost paid before step 1
(finetune's frozen-prefix cache), per-step losses and peak memory. Steady tokens/s = batch x mean example
length / median step after warm-up (last step dropped); end-to-end tokens/s = the tokens of all `iters`
steps / (loop time + one-off cost).

This module runs the rounds. Below it: bench/training_tools.py prepares the data and runs one tool once,
bench/training_summary.py turns the runs into figures and notes, bench/training_runs.py holds the records
and the pure parsers both share.
"""

from __future__ import annotations

import os
from pathlib import Path

from bench.stats import Section
from bench.training_runs import TOOLS, Run, Settings, rotated
from bench.training_summary import summarize
from bench.training_tools import prepare, run_finetune, run_mlx_lm, run_peft


def make_settings(
    key: str,
    model_spec: str,
    profile: str,
    overrides: list[str],
    p: dict,
    *,
    iters: int,
    warmup: int,
    rounds: int,
    peft_threads: int,
) -> Settings:
    """What every tool trains with in one setting, from the config prepare() loaded (profile plus overrides)."""
    cfg = p["cfg"]
    lora = cfg.lora
    return Settings(
        key=key,
        model=model_spec,
        model_path=str(p["model_path"]),
        profile=profile,
        overrides=list(overrides),
        mask_prompt=cfg.data.mask_prompt,
        batch_size=cfg.training.batch_size,
        max_seq_length=cfg.data.max_seq_length,
        rank=lora.rank,
        scale=lora.scale,
        dropout=lora.dropout,
        num_layers=p["n_layers"] if lora.num_layers == -1 else lora.num_layers,
        keys=lora.keys,
        learning_rate=cfg.training.learning_rate,
        seed=cfg.training.seed,
        iters=iters,
        warmup=warmup,
        rounds=rounds,
        peft_threads=peft_threads,
        profile_iters=cfg.training.iters,
    )


def run_round(st: Settings, p: dict, work: Path, rnd: int, timeout: float, log) -> list[Run]:
    """One round of one setting: its four tools, in the order rotated for this round."""
    runners = {
        "finetune": lambda: run_finetune(st, work, rnd, timeout, shortcuts=True),
        "finetune_off": lambda: run_finetune(st, work, rnd, timeout, shortcuts=False),
        "mlx_lm": lambda: run_mlx_lm(st, work, p["mlx_data"], p["mlx_model"], rnd, timeout),
        "peft": lambda: run_peft(st, work, p["examples"], rnd, timeout),
    }
    runs = []
    for tool in rotated(TOOLS, rnd):
        run = runners[tool]()
        failed = f" FAILED {run.error[:200]}" if run.error else ""
        log(f"  training {st.key} {tool} round {rnd}: {run.wall_s:.0f} s{failed}")
        runs.append(run)
    return runs


def run_section(
    work: Path,
    *,
    model_spec: str = "smollm2-135m",
    profile: str = "quick",
    iters: int = 8,
    warmup: int = 2,
    rounds: int = 2,
    overrides: list[str] = (),
    release_profile: str = "release",
    release_epochs: int | None = None,
    release_rounds: int = 1,
    release_warmup: int = 2,
    peft_threads: int | None = None,
    matmul_gflops: float | None = None,
    timeout: float = 900,
    log=print,
) -> Section:
    """Both settings, every tool, round by round: in each round each setting's four tools in rotated order.

    The release setting runs the profile's own training.iters, as users run it, unless release_epochs
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
        st = make_settings(
            key, model_spec, prof, sets, p, iters=n_iters, warmup=wu, rounds=n_rounds, peft_threads=threads
        )
        settings.append(st)
        p["data"]["matmul_gflops"] = matmul_gflops
        prepared[key], data[key] = p, p["data"]
        log(
            f"  training {key}: {p['data']['examples']} examples, {n_iters} steps per run, {n_rounds} round(s)"
        )
    runs: list[Run] = []
    for rnd in range(max((st.rounds for st in settings), default=0)):
        for st in settings:
            if rnd < st.rounds:
                runs += run_round(st, prepared[st.key], work / st.key, rnd, timeout, log)
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
