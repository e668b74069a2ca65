"""Calibrate finetune.train.memory against MLX's measured training peaks.

Each configuration runs in its own subprocess, so one run's peak never leaks into the next. A child
builds a random-weight Llama (mlx_lm.models.llama) from a config dict, prepares it exactly as FineTune
trains (prepare_model / make_optimizer of finetune.train.setup), runs a few steps of mlx-lm's train() with our
masked loss and batches, and reports mx.get_peak_memory() measured from after the weights were built.

  python bench/calibrate_memory.py              # the default set
  python bench/calibrate_memory.py --quick      # 4 small runs
  python bench/calibrate_memory.py --json out.json --tolerance 15

Exit status 1 if any |error| exceeds --tolerance. bfloat16 runs are slow on CPU (no BLAS path) and
are only in --set all.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import io
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

SMALL = {"hidden_size": 256, "intermediate_size": 768, "num_attention_heads": 4, "num_key_value_heads": 2}
# SmolLM2-135M's block shape (the real model has 30 layers).
SMOL = {"hidden_size": 576, "intermediate_size": 1536, "num_attention_heads": 9, "num_key_value_heads": 3}


def model_config(
    block: dict, layers: int, vocab: int = 49152, dtype: str = "float32", tied: bool = True
) -> dict:
    return {
        "model_type": "llama",
        "num_hidden_layers": layers,
        "vocab_size": vocab,
        "rms_norm_eps": 1e-5,
        "tie_word_embeddings": tied,
        "torch_dtype": dtype,
        **block,
    }


def run_spec(name: str, model: dict, ft: str, batch: int, seq: int, **run) -> dict:
    return {"name": name, "model": model, "fine_tune_type": ft, "batch_size": batch, "seq_len": seq, **run}


def specs(which: str) -> list[dict]:
    """Named runs: 'quick' (4 small runs), 'default' (the brief's grid + SmolLM2's real depth), 'all' (+ bf16)."""
    small4, smol4 = model_config(SMALL, 4), model_config(SMOL, 4)
    if which == "quick":
        out = [run_spec(f"small4-{ft}", small4, ft, 2, 128) for ft in ("lora", "full")]
        return out + [
            run_spec("smol4-lora", smol4, "lora", 4, 64),
            run_spec("small4-dora", small4, "dora", 1, 256),
        ]
    out = []
    qv = ["self_attn.q_proj", "self_attn.v_proj"]
    for tag, block in (("small", SMALL), ("smol", SMOL)):
        for layers in (4, 8):
            cfg = model_config(block, layers)
            for ft in ("lora", "full"):
                out += [
                    run_spec(f"{tag}{layers}-{ft}", cfg, ft, b, s)
                    for b, s in ((1, 64), (2, 128), (4, 256), (1, 256))
                ]
                out.append(run_spec(f"{tag}{layers}-{ft}-ckpt", cfg, ft, 4, 256, grad_checkpoint=True))
            out.append(run_spec(f"{tag}{layers}-dora", cfg, "dora", 2, 128))
        deep = model_config(block, 8)
        out.append(run_spec(f"{tag}8-lora-last2", deep, "lora", 4, 256, lora_num_layers=2))
        out.append(run_spec(f"{tag}8-lora-qv-r16", deep, "lora", 2, 128, lora_rank=16, lora_keys=qv))
    smol30 = model_config(SMOL, 30)  # SmolLM2-135M's real shape
    out.append(run_spec("smol30-lora", smol30, "lora", 4, 64))
    out.append(run_spec("smol30-full", smol30, "full", 1, 64))
    out.append(run_spec("small4-full-sgd", small4, "full", 1, 64, optimizer="sgd"))
    out.append(run_spec("small4-untied-full", model_config(SMALL, 4, tied=False), "full", 2, 128))
    out.append(run_spec("small4-lora-long", model_config(SMALL, 4, vocab=8192), "lora", 1, 1024))
    if which == "all":
        for ft in ("lora", "full"):
            out.append(run_spec(f"small2-{ft}-bf16", model_config(SMALL, 2, 8192, "bfloat16"), ft, 1, 256))
            # activations dominate: half-precision LoRA's float32 adapter inputs outweigh full's states
            out.append(
                run_spec(f"small4-{ft}-bf16-v1k", model_config(SMALL, 4, 1024, "bfloat16"), ft, 4, 256)
            )
        out.append(run_spec("smol4-lora-bf16", model_config(SMOL, 4, dtype="bfloat16"), "lora", 1, 128))
    return out


# ---------------------------------------------------------------- child: one measured run


def measure(spec: dict) -> dict:
    # First: `finetune` loads OpenBLAS and sets MLX defaults before mlx.core, exactly as training does.
    importlib.import_module("finetune")
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from mlx_lm.models import llama
    from mlx_lm.tuner.callbacks import TrainingCallback
    from mlx_lm.tuner.trainer import TrainingArgs, train

    from finetune.config.schema import RunConfig
    from finetune.train.batches import TokenDataset, make_iterate_batches, masked_loss
    from finetune.train.setup import make_optimizer, prepare_model

    seq, batch, steps = spec["seq_len"], spec["batch_size"], spec.get("steps", 3)
    mx.random.seed(0)
    model = llama.Model(llama.ModelArgs.from_dict(spec["model"]))
    model.set_dtype(getattr(mx, spec["model"].get("torch_dtype", "float32")))
    cfg = RunConfig.model_validate(
        {
            "data": {"max_seq_length": seq + 1},  # sequences of seq+1 ids feed the model seq tokens
            "lora": {
                "rank": spec.get("lora_rank", 8),
                "num_layers": spec.get("lora_num_layers", -1),
                "keys": spec.get("lora_keys"),
            },
            "training": {
                "fine_tune_type": spec["fine_tune_type"],
                "optimizer": spec.get("optimizer", "adam"),
                "batch_size": batch,
                "grad_checkpoint": spec.get("grad_checkpoint", False),
            },
        }
    )
    prepare_model(model, cfg)
    optimizer = make_optimizer(cfg)
    mx.eval(model.parameters())
    mx.clear_cache()
    weights = mx.get_active_memory()
    vocab = spec["model"]["vocab_size"]
    rows = [([(7 * i + 13 * j) % vocab for j in range(seq + 1)], [1] * (seq + 1)) for i in range(2 * batch)]
    peaks: list[int] = []

    class Peaks(TrainingCallback):
        def on_train_loss_report(self, info: dict) -> None:
            peaks.append(int(mx.get_peak_memory()))

    mx.reset_peak_memory()
    tic = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, contextlib.redirect_stdout(io.StringIO()):
        args = TrainingArgs(
            batch_size=batch,
            iters=steps,
            steps_per_report=1,
            steps_per_eval=steps + 1,
            steps_per_save=steps + 1,
            max_seq_length=seq + 1,
            adapter_file=os.path.join(tmp, "a.safetensors"),
            grad_checkpoint=spec.get("grad_checkpoint", False),
        )
        train(
            model,
            optimizer,
            TokenDataset(rows, "calibration"),
            None,
            args=args,
            loss=masked_loss,
            iterate_batches=make_iterate_batches(0),
            training_callback=Peaks(),
        )
    return {
        "peak_bytes": max(peaks),
        "step_peaks": peaks,
        "weights_bytes": int(weights),
        "trainable_params": int(sum(v.size for _, v in tree_flatten(model.trainable_parameters()))),
        "seconds": round(time.perf_counter() - tic, 1),
    }


def measure_in_subprocess(spec: dict, timeout: float = 1800) -> dict:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--one", json.dumps(spec)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT)
    if proc.returncode != 0:
        raise RuntimeError(f"{spec['name']}: child exited {proc.returncode}: {proc.stderr[-1500:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


# ---------------------------------------------------------------- parent: predicted vs measured


def predict(spec: dict):
    from finetune.train.memory import ModelShape, estimate

    run = {
        k: spec[k]
        for k in ("lora_rank", "lora_num_layers", "lora_keys", "grad_checkpoint", "optimizer")
        if k in spec
    }
    return estimate(
        ModelShape.from_hf_config(spec["model"]),
        fine_tune_type=spec["fine_tune_type"],
        batch_size=spec["batch_size"],
        seq_len=spec["seq_len"],
        **run,
    )


def row(spec: dict, measured: dict) -> dict:
    from finetune.train.memory import compare

    est = predict(spec)
    cmp = compare(est, measured["peak_bytes"])
    if est.trainable_params != measured["trainable_params"]:
        raise AssertionError(
            f"{spec['name']}: trainable params predicted {est.trainable_params:,}, "
            f"MLX has {measured['trainable_params']:,}"
        )
    return {
        "spec": spec,
        "measured": measured,
        "predicted_bytes": est.total_bytes,
        "error_pct": cmp.error_pct,
        "peak_phase": est.peak_phase,
        "breakdown": est.breakdown,
    }


def table(rows: list[dict]) -> str:
    mib = 2**20
    lines = [
        "| run | dtype | batch x seq | predicted MiB | measured MiB | error % | phase |",
        "|---|---|---|---:|---:|---:|---|",
    ]
    for r in rows:
        s = r["spec"]
        lines.append(
            f"| {s['name']} | {s['model'].get('torch_dtype', 'float32')} | {s['batch_size']} x {s['seq_len']} "
            f"| {r['predicted_bytes'] / mib:.1f} | {r['measured']['peak_bytes'] / mib:.1f} "
            f"| {r['error_pct']:+.1f} | {r['peak_phase']} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--one", help="child mode: measure one JSON spec and print JSON")
    p.add_argument("--quick", action="store_true", help="a few small runs")
    p.add_argument("--set", choices=["default", "all"], default="default")
    p.add_argument("--filter", default="", help="only runs whose name contains this")
    p.add_argument("--json", help="write every row (spec, measurement, prediction) here")
    p.add_argument("--tolerance", type=float, default=15.0, help="max |error %%| before exiting 1")
    a = p.parse_args(argv)
    if a.one:
        print(json.dumps(measure(json.loads(a.one))))
        return 0
    rows = []
    for spec in specs("quick" if a.quick else a.set):
        if a.filter not in spec["name"]:
            continue
        rows.append(row(spec, measure_in_subprocess(spec)))
        r = rows[-1]
        print(
            f"{spec['name']:24s} b{spec['batch_size']} s{spec['seq_len']:<5d} error {r['error_pct']:+6.1f}% "
            f"({r['measured']['seconds']} s)",
            file=sys.stderr,
            flush=True,
        )
    print(table(rows))
    worst = max((abs(r["error_pct"]) for r in rows), default=0.0)
    print(f"\n{len(rows)} runs, worst |error| {worst:.1f}% (tolerance {a.tolerance:.0f}%)")
    if a.json:
        from finetune.system.atomic import atomic_write_json

        atomic_write_json(Path(a.json), rows)
    return 0 if worst <= a.tolerance else 1


if __name__ == "__main__":
    raise SystemExit(main())
