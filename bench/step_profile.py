"""Where a training step's time goes, and the matmul FLOPs it executes (a child of bench/roofline.py).

FineTune's own training setup (finetune.train.engine.train_run: the model, LoRA, the exact shortcuts, the
batches) runs with `profiling_trainer` injected in place of mlx-lm's loop. Each step is timed phase by phase:
data (build the next batch, prefix rows included), forward (the loss alone), backward (loss and gradients,
less the forward), optimizer (update and evaluate the new weights), then the whole step once more as mlx-lm
runs it (one evaluation). FLOPs are counted from the shapes of the work each step did: the blocks it ran (above
the cached prefix, if any), its trimmed width, and the rows the LM head saw (loss positions only, if on).

`python -m bench.step_profile MODEL PROFILE STEPS [--set k=v ...]` prints one JSON line.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import finetune  # noqa: F401  (OpenBLAS before any mlx import, and the same thread defaults as training)
from finetune.system.blas import gflops, seconds_per_call

MAX_REPS = 10_000  # a step's matmul shapes are timed for their budget, not a count


@dataclass(frozen=True)
class Shapes:
    """What one step's matmul count needs to know about the model as prepared for training."""

    blocks: int
    cut: int  # first block with a trainable parameter: blocks below it never need gradients
    linear_below: int  # frozen linear weight elements in blocks [0, cut)
    linear_trained: int  # frozen linear weight elements in blocks [cut, blocks)
    lora: int  # LoRA A and B elements, all blocks
    attention: int  # query heads x head dim, per block
    hidden: int
    vocab: int


def step_flops(m: Shapes, rows: int, width: int, head_rows: int, prefix: bool) -> dict[str, float]:
    """Matmul FLOPs of one LoRA step as executed (pure). Attention scores and values count the full width
    (MLX computes the masked square); the frozen base and head get input gradients only, LoRA also weights."""
    tokens = rows * width
    trained = m.blocks - m.cut
    attention = 4 * width * m.attention  # per token per block: Q K^T and P V
    below = 0 if prefix else m.cut * tokens * attention + 2 * tokens * m.linear_below
    head = 2 * m.hidden * m.vocab * head_rows
    forward = (
        below + 2 * tokens * m.linear_trained + trained * tokens * attention + 2 * tokens * m.lora + head
    )
    backward = 2 * tokens * m.linear_trained + 2 * trained * tokens * attention + 4 * tokens * m.lora + head
    return {"forward": float(forward), "backward": float(backward), "head": float(2 * head)}


def model_shapes(model) -> Shapes:
    from mlx.utils import tree_flatten

    blocks = list(model.layers)
    lin, lora, trainable = [], 0, []
    for block in blocks:
        flat = tree_flatten(block.parameters())
        lin.append(sum(v.size for k, v in flat if k.endswith("weight") and v.ndim == 2))
        lora += sum(v.size for k, v in flat if k.endswith(("lora_a", "lora_b")))
        trainable.append(bool(tree_flatten(block.trainable_parameters())))
    cut = trainable.index(True) if any(trainable) else len(blocks)
    args, q_proj = model.args, blocks[0].self_attn.q_proj
    return Shapes(
        blocks=len(blocks),
        cut=cut,
        linear_below=sum(lin[:cut]),
        linear_trained=sum(lin[cut:]),
        lora=lora,
        attention=getattr(q_proj, "linear", q_proj).weight.shape[0],  # LoRA wraps the linear it adapts
        hidden=args.hidden_size,
        vocab=args.vocab_size,
    )


def batch_shape(batch) -> tuple[int, int, int, bool]:
    """(rows, width, head rows, prefix cached) of a batch as finetune.train.shortcuts.build_batch lays it out."""
    ids = batch[0]
    rows, width = ids.shape[0], ids.shape[1] - 1
    prefix = any(a.ndim == 3 for a in batch[2:])
    head_rows = batch[-1].size if len(batch) > 2 and batch[-1].ndim == 1 else rows * width
    return rows, width, head_rows, prefix


def profiling_trainer(steps: int, out: dict) -> Callable:
    """A drop-in for mlx_lm.tuner.trainer.train that times `steps` steps phase by phase into out["steps"]."""

    def train(model, optimizer, train_dataset, val_dataset=None, args=None, loss=None, iterate_batches=None,
              training_callback=None):  # fmt: skip
        import mlx.core as mx
        import mlx.nn as nn

        value_grad = nn.value_and_grad(model, loss)
        state = [model.state, optimizer.state]
        batches = iterate_batches(dataset=train_dataset, batch_size=args.batch_size,
                                  max_seq_length=args.max_seq_length, loop=True)  # fmt: skip
        model.train()
        out["shapes"] = asdict(model_shapes(model))
        rows = []
        for _ in range(steps):
            t = [time.perf_counter()]
            batch = next(batches)
            mx.eval(batch)
            t.append(time.perf_counter())
            mx.eval(loss(model, *batch))
            t.append(time.perf_counter())
            (value, ntoks), grad = value_grad(model, *batch)
            mx.eval(value, ntoks, grad)
            t.append(time.perf_counter())
            optimizer.update(model, grad)
            mx.eval(state)
            t.append(time.perf_counter())
            (value, ntoks), grad = value_grad(model, *batch)  # the whole step, one evaluation, as mlx-lm
            optimizer.update(model, grad)
            mx.eval(state, value, ntoks)
            t.append(time.perf_counter())
            b, w, head_rows, prefix = batch_shape(batch)
            rows.append({"rows": b, "width": w, "head_rows": head_rows, "prefix": prefix,
                         "data": t[1] - t[0], "forward": t[2] - t[1], "backward": t[3] - t[2] - (t[2] - t[1]),
                         "optimizer": t[4] - t[3], "step": t[5] - t[4]})  # fmt: skip
        out["steps"] = rows
        mid = rows[len(rows) // 2]
        a, b = mx.random.normal((1024, 1024)), mx.random.normal((1024, 1024))
        out["peak_gflops"] = gflops(lambda: mx.eval(a @ b), 1024, 0.5, max_reps=200)
        out["shape_gflops"] = shape_gflops(
            model_shapes(model), mid["rows"] * mid["width"], mid["head_rows"], model
        )

    return train


def shape_gflops(m: Shapes, tokens: int, head_rows: int, model, budget_s: float = 0.3) -> dict[str, float]:
    """GFLOP/s MLX reaches on the step's own matmuls, in the layouts training uses: x @ W.T forward and
    g @ W for the input gradient, per weight shape; "weighted" weighs each by the FLOPs it carries in a step
    (every trained block once, the head once)."""
    import mlx.core as mx
    from mlx.utils import tree_flatten

    weights = [v for k, v in tree_flatten(model.layers[m.cut].parameters()) if v.ndim == 2]
    trained = m.blocks - m.cut
    shapes = [(tokens, w.shape[0], w.shape[1], trained) for w in weights if min(w.shape) > 64]  # not LoRA
    shapes.append((head_rows, m.vocab, m.hidden, 1))
    flops, seconds, out = 0.0, 0.0, {}
    for rows, n_out, n_in, count in shapes:
        x, g, w = (
            mx.random.normal((rows, n_in)),
            mx.random.normal((rows, n_out)),
            mx.random.normal((n_out, n_in)),
        )
        mx.eval(x, g, w)
        per = seconds_per_call(lambda x=x, w=w: mx.eval(x @ w.T), budget_s, MAX_REPS) + seconds_per_call(
            lambda g=g, w=w: mx.eval(g @ w), budget_s, MAX_REPS
        )
        f = 4 * rows * n_in * n_out
        out[f"{rows}x{n_in}x{n_out}"] = f / per / 1e9
        flops, seconds = flops + count * f, seconds + count * per
    out["weighted"] = flops / seconds / 1e9
    return out


def main(argv: list[str]) -> int:
    from finetune.config.loader import load_config
    from finetune.data.prepare import prepare_for_run
    from finetune.models.resolve import resolve_model
    from finetune.models.tokenizer import load_tokenizer
    from finetune.train.engine import train_run

    model_name, profile, steps = argv[0], argv[1], int(argv[2])
    sets = [a for a in argv[3:] if a != "--set"]
    cfg = load_config(profile, None, [f"model.name={model_name}", *sets])
    path = Path(resolve_model(model_name).path)
    out: dict = {"model": model_name, "profile": profile, "iters": cfg.training.iters}
    lines: list[str] = []
    with tempfile.TemporaryDirectory(prefix="ft-step-profile-") as tmp:
        data_dir = Path(tmp) / "data"
        prepare_for_run(cfg.data, data_dir, load_tokenizer(path))
        train_run(cfg, path, data_dir, Path(tmp) / "run", train_fn=profiling_trainer(steps, out),
                  log=lines.append)  # fmt: skip
    text = "\n".join(lines)
    once = re.search(r"prefix computed once in ([0-9.]+) s", text)
    out["prefix_once_s"] = float(once.group(1)) if once else None
    out["shortcuts"] = [ln.strip() for ln in text.splitlines() if "shortcut" in ln or ln.startswith("  - ")]

    print(json.dumps(out))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
