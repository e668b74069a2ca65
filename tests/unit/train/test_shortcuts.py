"""Exactness tests: training through shortcuts.py equals the plain masked_loss path step for step.

Tolerances are measured, not guessed: see the constants below.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx.optimizers as optim
import numpy as np
import pytest
from mlx.utils import tree_flatten
from mlx_lm.tuner.callbacks import TrainingCallback
from mlx_lm.tuner.trainer import TrainingArgs, evaluate
from mlx_lm.tuner.trainer import train as mlx_train
from mlx_lm.tuner.utils import linear_to_lora_layers

from finetune.train import shortcuts as sc
from finetune.train.batches import TokenDataset, _pack, make_iterate_batches, masked_loss
from tests import noise

# Tolerances are k x a noise floor measured in each test (tests/noise.py): the plain path against itself with
# each batch's rows in another order (reversed; rotated by one), the same maths summed in another order, as the
# shortcuts sum it in another order. The larger of the two is the floor (one sample can happen to be small).
# Multi-step runs are judged on per-step losses, per-tensor Frobenius norms of the trained weights and the
# validation loss, never on max-element differences: after Adam those are chaotic (tiny gradients are
# normalised up) and measure the CPU's reassociation, not the shortcut.
# K_STEPS = 20 for 10-step runs: across 8 architectures, 5 training variants and 4 BLAS kernels (docs/portability.md)
# the shortcut's error reached 4.5 floors (one noisy sample against another, amplified by Adam), so 20 keeps a 4x
# margin, while the float16 prefix-cache fault below sits ~4,500 floors out. Where rows cannot be reordered
# (dropout draws a mask per row) the floor is the plain path against its float64 twin, which is larger (up to
# 7x): looser, not sharper. K_GRAD = 10 for one step at identical weights (no chaos; reached 1.2): the sharp test.
ROWS_ORDERS = {"reversed": lambda rows: rows[::-1], "rotated": lambda rows: rows[1:] + rows[:1]}
K_STEPS = 20
K_GRAD = 10

# ---------------------------------------------------------------- tiny models of each architecture

BASE = {"hidden_size": 64, "num_hidden_layers": 4, "intermediate_size": 128, "num_attention_heads": 4,
        "num_key_value_heads": 2, "rms_norm_eps": 1e-5, "vocab_size": 512}  # fmt: skip

CONFIGS = {
    "llama-tied": {"model_type": "llama", **BASE, "tie_word_embeddings": True},
    "llama-untied": {"model_type": "llama", **BASE, "tie_word_embeddings": False},
    "llama-sliding": {"model_type": "llama", **BASE, "sliding_window": 8,
                      "layer_types": ["sliding_attention", "full_attention"] * 2},
    "qwen2": {"model_type": "qwen2", **BASE, "tie_word_embeddings": False},
    "qwen3": {"model_type": "qwen3", **BASE, "head_dim": 16, "max_position_embeddings": 512,
              "tie_word_embeddings": True, "rope_theta": 10000.0},
    "gemma3_text": {"model_type": "gemma3_text", **BASE, "head_dim": 16, "query_pre_attn_scalar": 16,
                    "sliding_window": 8, "sliding_window_pattern": 2},
    "gemma2": {"model_type": "gemma2", **BASE, "head_dim": 16, "query_pre_attn_scalar": 16},
    "gpt2": {"model_type": "gpt2", "n_ctx": 128, "n_embd": 64, "n_head": 4, "n_layer": 4, "n_positions": 128,
             "layer_norm_epsilon": 1e-5, "vocab_size": 512},
}  # fmt: skip


def build(name: str, seed: int = 0):
    import importlib

    cfg = CONFIGS[name]
    mod = importlib.import_module(f"mlx_lm.models.{cfg['model_type']}")
    mx.random.seed(seed)
    model = mod.Model(mod.ModelArgs.from_dict(cfg))
    if name == "gemma3_text":  # its loader ties when the checkpoint has no lm_head; test the tied path here
        model.tie_word_embeddings = True
        model.pop("lm_head")
    mx.eval(model.parameters())
    return model


def toy_dataset(n=24, seed=0, lo=12, hi=60, answer=5, mask_all=False, vocab=512, cut=None) -> TokenDataset:
    """Random 'prompt + answer' rows: loss mask 1 on the last `answer` tokens (or on every token).

    `cut` truncates like load_split (tokenize_example) and drops rows left with no target.
    """
    rng = np.random.default_rng(seed)
    items = []
    while len(items) < n:
        k = int(rng.integers(lo, hi))
        ids = rng.integers(1, vocab, k).tolist()
        ids[int(rng.integers(0, k))] = 0  # token 0 is also the pad id: real zeros must not confuse anything
        mask = [1] * k if mask_all else [0] * (k - answer - 2) + [1] * answer + [0, 0]  # + end-of-turn tokens
        if cut:
            ids, mask = ids[:cut], mask[:cut]
        if sum(mask[1:]):
            items.append((ids, mask))
    return TokenDataset(items, "toy")


# ---------------------------------------------------------------- the harness


class Losses(TrainingCallback):
    def __init__(self):
        self.losses = []

    def on_train_loss_report(self, info):
        self.losses.append(info["train_loss"])


def attach(model, lora_layers: int, dropout: float = 0.0, keys=None):
    model.freeze()
    mx.random.seed(1)
    params = {"rank": 4, "scale": 20.0, "dropout": dropout}
    if keys:
        params["keys"] = keys
    linear_to_lora_layers(model, lora_layers, params)
    return model


def run(model, dataset, *, shortcuts: bool, steps=10, batch_size=4, msl=256, lr=2e-3, tmp: Path,
        grad_checkpoint=False, grad_accum=1, val=None, f64=False, rows_order=None, tamper=None,
        **plan_kw):  # fmt: skip
    """Train `steps` with mlx-lm's own train(); returns per-step losses, weights, val loss, plan.

    f64: the plain path in float64. rows_order(rows): the plain path with each batch's rows in another order
    (the same maths, summed in another order). tamper(setup) may plant a fault into the shortcut path, for
    the test that shows the comparison fails on one."""
    p = None
    if f64:
        model.set_dtype(mx.float64)
    if shortcuts:
        s = sc.setup(model, seed=0, max_seq_length=msl, train_set=dataset, val_set=val, **plan_kw)
        if tamper:
            tamper(s)
        loss, it, it_eval, p = s.loss, s.iterate_train, s.iterate_eval, s.plan
    else:
        build = (lambda rows, width: _pack(rows_order(rows), width)) if rows_order else None
        loss, it, it_eval = (
            masked_loss,
            make_iterate_batches(0, build=build),
            make_iterate_batches(0, build=build),
        )
    cb = Losses()
    mx.random.seed(2)
    args = TrainingArgs(batch_size=batch_size, iters=steps, steps_per_report=1, steps_per_eval=10**9,
                        steps_per_save=10**9, max_seq_length=msl, adapter_file=str(tmp / "a.safetensors"),
                        grad_checkpoint=grad_checkpoint, grad_accumulation_steps=grad_accum)  # fmt: skip
    try:
        mlx_train(model, optim.Adam(learning_rate=lr), dataset, None, args=args, loss=loss, iterate_batches=it,
                  training_callback=cb)  # fmt: skip
    except RuntimeError as exc:
        # safetensors has no float64; saving the adapter is the last thing train() does
        if not (f64 and "save_safetensors" in str(exc) and len(cb.losses) == steps):
            raise
    v = None
    if val is not None:
        v = evaluate(model, val, batch_size=batch_size, num_batches=-1, max_seq_length=msl, loss=loss,
                     iterate_batches=it_eval)  # fmt: skip
    weights = {
        k: np.array(w.astype(mx.float64) if f64 else w) for k, w in tree_flatten(model.trainable_parameters())
    }
    return cb.losses, weights, v, p


def rel_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(noise.rel_max(a[k], b[k]) for k in a)


def fro_diff(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(noise.rel_fro(a[k], b[k]) for k in a)


def loss_diff(a: list, b: list) -> float:
    assert len(a) == len(b)
    return max(abs(x - y) / abs(y) for x, y in zip(a, b, strict=True))


def compare(name, plain, fast, refs, k=K_STEPS) -> None:
    """The shortcut run vs the plain one, each figure within k x the plain path's own noise floor: the largest
    difference within the pairs `refs` (runs of the same maths summed in another order). Per-step losses,
    per-tensor Frobenius norms of the trained weights, validation loss."""
    (lp, wp, vp, _), (lf, wf, vf, _) = plain, fast
    floor = lambda f: max(f(a, r) for a, r in refs)  # noqa: E731
    print(f"{name}: losses {lp[0]:.4f}->{lp[-1]:.4f}")
    assert abs(lp[-1] - lp[0]) > 1e-3  # it trained: the comparison is not between two frozen models
    failures = [
        noise.measure(
            f"{name} per-step loss", loss_diff(lf, lp), floor(lambda a, r: loss_diff(a[0], r[0])), k
        ),
        noise.measure(
            f"{name} weights Frobenius", fro_diff(wf, wp), floor(lambda a, r: fro_diff(a[1], r[1])), k
        ),
    ]
    if vp is not None:
        val = lambda a, b: abs(a - b) / abs(b)  # noqa: E731
        failures.append(
            noise.measure(f"{name} validation loss", val(vf, vp), floor(lambda a, r: val(a[2], r[2])), k)
        )
    assert not any(failures), "; ".join(f for f in failures if f)  # every figure measured, then judged


def trio(make, ds, *, reorder=True, **kw):
    """Runs of fresh models from `make()` on the same data: plain, shortcuts, and the noise-floor pairs: plain
    vs plain with rows reordered (each of ROWS_ORDERS), or without `reorder`, plain vs plain in float64."""
    plain, fast = run(make(), ds, shortcuts=False, **kw), run(make(), ds, shortcuts=True, **kw)
    if not reorder:
        return plain, fast, [(plain, run(make(), ds, shortcuts=False, f64=True, **kw))]
    return (
        plain,
        fast,
        [(plain, run(make(), ds, shortcuts=False, rows_order=o, **kw)) for o in ROWS_ORDERS.values()],
    )


# ---------------------------------------------------------------- batches


def test_batches_are_the_plain_ones():
    ds = toy_dataset(30)
    model = attach(build("llama-tied"), 2)
    p = sc.plan(model, enable=("loss_positions",), max_seq_length=48)  # no trim: shapes must match too
    for loop in (True, False):
        ours = sc.make_iterate_batches(p, None, seed=3, start_batch=5)(ds, 4, 48, loop=loop)
        plain = make_iterate_batches(3, start_batch=5)(ds, 4, 48, loop=loop)
        for _, a, b in zip(range(20), ours, plain, strict=False):
            assert mx.array_equal(a[0], b[0]) and mx.array_equal(a[1], b[1])
            np.testing.assert_array_equal(np.array(a[2]), np.flatnonzero(np.array(b[1])[:, 1:]))


def test_trim_drops_only_dead_columns():
    ds = toy_dataset(30)
    model = attach(build("llama-tied"), 2)
    p = sc.plan(model, enable=("trim",), max_seq_length=256)
    assert p.trim == 1 and sc.make_loss(p) is masked_loss
    ours = sc.make_iterate_batches(p, None, seed=0)(ds, 4, 256, loop=True)
    plain = make_iterate_batches(0)(ds, 4, 256, loop=True)
    saved = 0
    for _, (ids, mask), (pids, pmask) in zip(range(20), ours, plain, strict=False):
        w = ids.shape[1]
        assert mx.array_equal(ids, pids[:, :w]) and mx.array_equal(mask, pmask[:, :w])
        assert pmask[:, w:].sum().item() == 0 and mask[:, -1].sum().item() > 0
        saved += pids.shape[1] - w
    assert saved > 0


# ---------------------------------------------------------------- training equals the plain path


@pytest.mark.parametrize("name", list(CONFIGS))
def test_training_matches_plain(name, tmp_path):
    ds, val = toy_dataset(24, seed=1), toy_dataset(9, seed=2)
    plain, fast, ref = trio(lambda: attach(build(name), 2), ds, tmp=tmp_path, val=val)
    p = fast[3]
    assert p.cut == 2 and p.loss_positions and p.trim == 1, p.summary()
    compare(name, plain, fast, ref)


@pytest.mark.parametrize("mask_all", [False, True])
def test_long_rows_truncated_and_all_positions(mask_all, tmp_path):
    # max_seq_length below some lengths: _pack truncates those rows; every position trained in one variant.
    # mask_all: raw rows longer than max_seq_length (the packer truncates them); answers: load_split-style cut.
    ds = toy_dataset(24, seed=4, lo=20, hi=90, mask_all=mask_all, cut=None if mask_all else 64)
    runs = trio(lambda: attach(build("llama-tied"), 2), ds, msl=64, tmp=tmp_path)
    compare(f"truncated mask_all={mask_all}", *runs)


def test_dropout_above_cut_is_exact(tmp_path):
    # LoRA dropout lives inside the adapted (top) blocks: the prefix stays fixed and the masks drawn in
    # the top blocks come from the same RNG sequence as in the plain path (float64 draws the same masks).
    ds = toy_dataset(24, seed=1)
    # floor from float64: reordered rows would meet other dropout masks
    plain, fast, ref = trio(
        lambda: attach(build("llama-tied"), 2, dropout=0.1), ds, tmp=tmp_path, reorder=False
    )
    assert fast[3].cut == 2 and fast[3].loss_positions and not fast[3].trim
    assert "no trimming: active dropout" in fast[3].summary()
    compare("dropout 0.1", plain, fast, ref)


def test_grad_checkpoint_and_accumulation(tmp_path):
    from mlx_lm.models import llama

    original = llama.TransformerBlock.__call__  # train() patches the class for good: restore it
    try:
        ds = toy_dataset(24, seed=1)
        runs = trio(
            lambda: attach(build("llama-tied"), 2), ds, tmp=tmp_path, grad_checkpoint=True, grad_accum=2
        )
    finally:
        llama.TransformerBlock.__call__ = original
    compare("grad checkpoint + accumulation 2", *runs)


def test_dora_matches(tmp_path):
    def dora():
        model = build("llama-tied")
        model.freeze()
        mx.random.seed(1)
        linear_to_lora_layers(model, 2, {"rank": 4, "scale": 20.0, "dropout": 0.0}, use_dora=True)
        return model

    plain, fast, ref = trio(dora, toy_dataset(24, seed=1), tmp=tmp_path)
    assert fast[3].cut == 2
    compare("dora", plain, fast, ref)


def _grads(model, loss, batch):
    (value, n), g = nn.value_and_grad(model, loss)(model, *batch)
    return value.item(), n.item(), {k: np.array(v) for k, v in tree_flatten(g)}


@pytest.mark.parametrize("name", ["llama-tied", "llama-untied", "gemma2"])
def test_chunked_head_gradients_full_finetune(name):
    """Full fine-tuning (head weights trainable, tied or not) through checkpointed head chunks: one step at
    identical weights, so no chaos amplifies anything: the sharp test."""
    ds = toy_dataset(8, seed=5, mask_all=True)
    model = build(name)
    model.unfreeze()
    p = sc.plan(model, max_seq_length=256)
    assert not p.prefix and p.loss_positions
    p.chunk_bytes = 7 * 512 * 4  # 7 rows per chunk: many chunks, a ragged last one
    batch = next(sc.make_iterate_batches(p, None, 0)(ds, 4, 256, loop=True))
    lf, nf, gf = _grads(model, sc.make_loss(p), batch)
    lp, n_plain, gp = _grads(model, masked_loss, batch[:2])
    assert nf == n_plain and batch[-1].size > 7 * 4
    floors = [_grads(model, masked_loss, [mx.array(np.array(x)[order(list(range(len(x))))]) for x in batch[:2]])
              for order in ROWS_ORDERS.values()]  # fmt: skip
    loss_floor = max(abs(lr - lp) / lp for lr, _, _ in floors)
    noise.within(f"{name} full FT chunked: loss", abs(lf - lp) / lp, loss_floor, K_GRAD)
    noise.within(
        f"{name} full FT chunked: gradients",
        rel_diff(gf, gp),
        max(rel_diff(g, gp) for _, _, g in floors),
        K_GRAD,
    )


def test_chunked_head_in_training(tmp_path):
    ds = toy_dataset(24, seed=1, mask_all=True)
    runs = trio(lambda: attach(build("llama-tied"), 2), ds, tmp=tmp_path, chunk_bytes=5 * 512 * 4)
    compare("chunked head (5 rows)", *runs)


def half_precision_cache(setup) -> None:
    """A planted fault: block-cut inputs cached in float16 (a plausible memory saving) instead of the model's
    float32."""
    batch = setup.cache.batch
    setup.cache.batch = lambda seqs, width: batch(seqs, width).astype(mx.float16).astype(mx.float32)


def test_a_half_precision_prefix_cache_is_caught(tmp_path):
    """The comparison fails on a real fault (the float16 cache), thousands of floors out."""
    ds = toy_dataset(24, seed=1)
    make = lambda: attach(build("llama-tied"), 2)  # noqa: E731
    plain = run(make(), ds, shortcuts=False, tmp=tmp_path)
    ref = run(make(), ds, shortcuts=False, rows_order=ROWS_ORDERS["reversed"], tmp=tmp_path)
    bad = run(make(), ds, shortcuts=True, tmp=tmp_path, tamper=half_precision_cache)
    with pytest.raises(AssertionError, match="noise floor"):
        compare("fault: float16 prefix cache", plain, bad, [(plain, ref)])


BITWISE = """
import contextlib, io, sys, tempfile
from pathlib import Path
import finetune
from finetune.system.blas import active_blas
assert active_blas().name == "reference", active_blas()
import test_shortcuts as t
tmp = Path(tempfile.mkdtemp())
for name in sys.argv[1:]:
    ds = t.toy_dataset(24, seed=1)
    with contextlib.redirect_stdout(io.StringIO()):
        plain = t.run(t.attach(t.build(name), 2), ds, shortcuts=False, tmp=tmp)
        fast = t.run(t.attach(t.build(name), 2), ds, shortcuts=True, tmp=tmp)
    assert plain[0] == fast[0], (name, plain[0], fast[0])
    assert all((plain[1][k] == fast[1][k]).all() for k in plain[1]), name
    print(name, "bitwise identical")
"""


def test_bitwise_identical_with_reference_blas():
    """With MLX's reference BLAS (summation order independent of matrix shapes) nothing differs at all:
    the OpenBLAS differences are reassociation from different matmul shapes, not a change of maths."""
    import os
    import subprocess

    env = dict(os.environ, FT_BLAS_DISABLE="1", PYTHONPATH=os.pathsep.join(sys.path))
    names = ["llama-tied", "llama-sliding", "gemma3_text", "gemma2", "gpt2"]
    out = subprocess.run([sys.executable, "-c", BITWISE, *names], env=env, capture_output=True, text=True,
                         cwd=Path(__file__).parent, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("bitwise identical") == len(names)


# ---------------------------------------------------------------- not taken when it would not be exact


# ---------------------------------------------------------------- the real model


def _smollm2_path() -> Path:
    from finetune.models.resolve import resolve_model

    return resolve_model("smollm2-135m").path


def chatml_dataset(
    tokenizer, n: int, mask_prompt: bool = True, split: str = "train", system=None
) -> TokenDataset:
    """Release-style data: builtin 'mixed' Q&A rendered with ChatML, loss on the answers only."""
    from finetune.data.synthetic import build as synth
    from finetune.data.templates import get_template
    from finetune.data.tokens import tokenize_example

    sset = synth("mixed", n)
    rows = sset.train if split == "train" else sset.heldout
    tpl = get_template("chatml")
    items = []
    for row in rows:
        messages = ([{"role": "system", "content": system}] if system else []) + row["messages"]
        r = tpl.render(messages)
        items.append(tokenize_example(tokenizer, r.text, r.train_spans, 256, mask_prompt))
    return TokenDataset(items, "mixed")


@pytest.mark.skipif(
    os.environ.get("FT_REAL_MODEL_ENABLE") != "1",
    reason="the real model (~2 min): run with tier 2 (FT_REAL_MODEL_ENABLE=1 make test-e2e-real-model)",
)
def test_smollm2_release_settings(tmp_path):
    from mlx_lm import load

    def fresh():
        model, tok = load(str(_smollm2_path()))
        model.freeze()
        mx.random.seed(1)
        linear_to_lora_layers(model, 8, {"rank": 8, "scale": 20.0, "dropout": 0.0})
        return model, tok

    model, tok = fresh()
    ds = chatml_dataset(tok, 100)
    val = TokenDataset(chatml_dataset(tok, 100, split="heldout").items[:8], "val")
    plain = run(model, ds, shortcuts=False, lr=3e-4, tmp=tmp_path, val=val)
    del model
    fast = run(fresh()[0], ds, shortcuts=True, lr=3e-4, tmp=tmp_path, val=val)
    assert fast[3].cut == 22, fast[3].summary()
    refs = [(plain, run(fresh()[0], ds, shortcuts=False, rows_order=o, lr=3e-4, tmp=tmp_path, val=val))
            for o in ROWS_ORDERS.values()]  # fmt: skip
    compare("smollm2-135m release", plain, fast, refs)
    bad = run(fresh()[0], ds, shortcuts=True, lr=3e-4, tmp=tmp_path, val=val, tamper=half_precision_cache)
    with pytest.raises(AssertionError, match="noise floor"):  # the floor is sharp on the real model too
        compare("fault: smollm2-135m float16 prefix cache", plain, bad, refs)
