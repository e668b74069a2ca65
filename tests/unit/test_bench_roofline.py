"""bench/step_profile.py and bench/roofline.py: the FLOP count, the profiling trainer on a real training setup,
and the section's verdict. No timing assertions: the figures live in docs/benchmarks.md."""

from __future__ import annotations

import json

import pytest
from mlx.utils import tree_flatten

from bench import roofline, step_profile
from bench.step_profile import Shapes, step_flops
from finetune.config.loader import load_config
from finetune.train.engine import train_run

SMALL = Shapes(blocks=3, cut=1, linear_below=10, linear_trained=20, lora=4, attention=2, hidden=3, vocab=5)


def test_step_flops_counts_the_blocks_run_the_width_and_the_head_rows():
    f = step_flops(SMALL, rows=2, width=4, head_rows=3, prefix=True)
    # 8 tokens through 2 trained blocks: 2*8*20 linear, 2 blocks*8 tokens*4*4*2 attention, 2*8*4 LoRA, head 2*3*5*3
    assert f["forward"] == 320 + 512 + 64 + 90
    # input gradients through the frozen base and head, attention twice the forward, LoRA inputs and weights
    assert f["backward"] == 320 + 1024 + 128 + 90
    assert f["head"] == 180
    plain = step_flops(SMALL, rows=2, width=4, head_rows=8, prefix=False)
    assert plain["forward"] - f["forward"] == (1 * 8 * 32 + 2 * 8 * 10) + 2 * 3 * 5 * (
        8 - 3
    )  # block 0, all rows


@pytest.fixture(scope="module")
def profiled(tiny_hf, sums_dir, tmp_path_factory):
    """Three release-like steps of the real training setup on the tiny Llama, adapters on its top block."""
    cfg = load_config(overrides=["training.iters=3", "training.batch_size=4", "data.max_seq_length=64",
                                 "lora.rank=4", "lora.num_layers=1"])  # fmt: skip
    out, seen = {}, {}
    trainer = step_profile.profiling_trainer(3, out)

    def train(model, *args, **kwargs):
        seen["trainable"] = sum(v.size for _, v in tree_flatten(model.trainable_parameters()))
        seen["blocks"] = [sum(v.size for k, v in tree_flatten(b.parameters()) if k.endswith("weight") and v.ndim == 2)
                          for b in model.layers]  # fmt: skip
        return trainer(model, *args, **kwargs)

    train_run(cfg, tiny_hf, sums_dir, tmp_path_factory.mktemp("run"), train_fn=train, log=lambda _: None)
    return out, seen


def test_the_profiling_trainer_times_every_phase_of_real_steps(profiled):
    out, seen = profiled
    shapes = Shapes(**out["shapes"])
    assert (shapes.blocks, shapes.cut) == (2, 1)  # adapters on the top block: block 0 is the cached prefix
    assert shapes.lora == seen["trainable"]  # LoRA is all that trains
    assert (shapes.linear_below, shapes.linear_trained) == (seen["blocks"][0], seen["blocks"][1])
    assert (shapes.attention, shapes.hidden, shapes.vocab) == (4 * 16, 64, 49152)
    assert len(out["steps"]) == 3
    for step in out["steps"]:
        assert step["prefix"] and 0 < step["head_rows"] < step["rows"] * step["width"]
        assert all(step[p] > 0 for p in ("data", "forward", "optimizer", "step"))
    assert out["peak_gflops"] > 0 and out["shape_gflops"]["weighted"] > 0
    assert f"x{shapes.vocab}" in "".join(out["shape_gflops"])  # the head's own shape is measured


def _profile(step_s: float, shape_gflops: float, peak: float = 100.0) -> dict:
    steps = [{"rows": 4, "width": 25, "head_rows": 20, "prefix": True, "data": 0.001, "forward": step_s / 2,
              "backward": step_s / 2, "optimizer": 0.01, "step": step_s}] * 4  # fmt: skip
    shapes = {"blocks": 30, "cut": 22, "linear_below": 0, "linear_trained": 28_311_552, "lora": 651_264,
              "attention": 576, "hidden": 576, "vocab": 49152}  # fmt: skip
    return {"shapes": shapes, "steps": steps, "iters": 120, "prefix_once_s": 6.0, "peak_gflops": peak,
            "shape_gflops": {"20x576x49152": 40.0, "weighted": shape_gflops}, "shortcuts": []}  # fmt: skip


def test_the_section_judges_executed_flops_against_half_the_matmul_and_says_why_it_misses():
    gflop = roofline.summarize(_profile(1.0, 60.0))["gflop"]
    slow = roofline.build({"m": _profile(gflop / 30, 60.0)}, goal_model="m")  # 30 GFLOP/s of 100
    fraction = next(f for f in slow.figures if f.key == "roofline.m.fraction")
    assert fraction.value == pytest.approx(0.3) and fraction.met is False
    assert (
        "60 GFLOP/s" in fraction.reason and "50%" in fraction.reason
    )  # the shapes' ceiling, the step's share
    fast = roofline.build({"m": _profile(gflop / 55, 60.0)}, goal_model="m")
    assert next(f for f in fast.figures if f.key == "roofline.m.fraction").met is True
    json.dumps(fast.to_dict(), default=str)  # the JSON report takes it
    assert fast.tables[0]["rows"][0][-1] == "50.0"  # the one-off prefix, 6 s over 120 steps, in ms per step
