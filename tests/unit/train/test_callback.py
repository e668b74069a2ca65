"""finetune.train.callback: metrics, evaluation, checkpoints, best adapter, early stopping and signals per step."""

import os
import signal

import mlx.core as mx
import pytest

from finetune.config.loader import load_config
from finetune.system import signals
from finetune.train.batches import make_iterate_batches, masked_loss
from finetune.train.callback import EarlyStop, RunCallback, step_seed
from finetune.train.checkpoints import BEST_DIR, CHECKPOINTS, latest_checkpoint
from finetune.train.metrics import METRICS, read_metrics, train_losses, val_losses
from finetune.train.setup import make_optimizer, prepare_model
from finetune.train.splits import load_split
from tests.conftest import build_toy_model

INFO = {"learning_rate": 1e-3, "tokens_per_second": 50.0, "trained_tokens": 120}


def make_callback(run_dir, sums_dir, toy_tokenizer, *sets, start_step=0, state=None, val=True):
    cfg = load_config(overrides=["training.iters=6", "training.eval_every=2", "training.save_every=3",
                                 "training.batch_size=4", "lora.rank=4", "data.max_seq_length=64", *sets])  # fmt: skip
    model = build_toy_model()
    acfg = prepare_model(model, cfg)
    val_set = load_split(sums_dir / "valid.jsonl", toy_tokenizer, 64, True) if val else None
    return RunCallback(run_dir=run_dir, cfg=cfg, model=model, optimizer=make_optimizer(cfg), acfg=acfg,
                       val_set=val_set, iterate=make_iterate_batches(0), loss=masked_loss,
                       start_step=start_step, state=state or {})  # fmt: skip


def report(cb, loss):
    cb.on_train_loss_report({**INFO, "train_loss": loss})


def checkpoints(run_dir):
    root = run_dir / CHECKPOINTS
    return sorted(p.name for p in root.iterdir()) if root.exists() else []


def test_step_seed_is_deterministic_and_distinct():
    seeds = {step_seed(s, k) for s in range(3) for k in range(50)}
    assert len(seeds) == 150 and all(0 <= x < 2**31 for x in seeds)
    assert step_seed(7, 11) == step_seed(7, 11)


def test_each_step_logs_evaluates_and_checkpoints_on_schedule(tmp_path, sums_dir, toy_tokenizer):
    cb = make_callback(tmp_path, sums_dir, toy_tokenizer)
    for step in range(1, 7):
        report(cb, 3.0 - step / 10)
        if step == 1:
            assert not (tmp_path / BEST_DIR).exists() and checkpoints(tmp_path) == []
        if step == 2:
            assert (
                tmp_path / BEST_DIR / "adapters.safetensors"
            ).is_file()  # the first evaluation is the best
    cb.close()
    rows = read_metrics(tmp_path / METRICS)
    assert train_losses(rows) == pytest.approx([2.9, 2.8, 2.7, 2.6, 2.5, 2.4])
    train_row = next(r for r in rows if r["kind"] == "train")
    assert train_row.keys() >= {
        "step",
        "learning_rate",
        "tokens_per_second",
        "trained_tokens",
        "peak_memory_bytes",
    }
    assert [s for s, _ in val_losses(rows)] == [2, 4, 6]
    assert checkpoints(tmp_path) == ["step-0000003", "step-0000006"]
    # the model did not change, so later evaluations are no better: counted, not a new best
    assert cb.state() == {
        "best_val": val_losses(rows)[0][1],
        "bad_evals": 2,
        "last_train_loss": pytest.approx(2.4),
    }
    assert cb.step == 6


def test_reseeds_mlx_after_every_step(tmp_path, sums_dir, toy_tokenizer):
    cb = make_callback(tmp_path, sums_dir, toy_tokenizer, "training.seed=5")
    report(cb, 1.0)  # step 1: no evaluation
    drawn = mx.random.uniform(shape=(4,))
    mx.random.seed(step_seed(5, 1))
    assert mx.array_equal(drawn, mx.random.uniform(shape=(4,)))
    cb.close()


def test_early_stopping_after_patience_evaluations(tmp_path, sums_dir, toy_tokenizer):
    cb = make_callback(tmp_path, sums_dir, toy_tokenizer, "training.early_stopping_patience=2",
                       "training.iters=20")  # fmt: skip
    for _ in range(5):
        report(cb, 1.0)
    with pytest.raises(EarlyStop, match="no better val loss in 2 evaluations"):
        report(cb, 1.0)
    assert cb.step == 6
    cb.close()


def test_checkpoints_only_at_optimizer_updates(tmp_path, sums_dir, toy_tokenizer):
    cb = make_callback(tmp_path, sums_dir, toy_tokenizer, "training.grad_accumulation_steps=2",
                       "training.iters=12")  # fmt: skip
    for _ in range(9):
        report(cb, 1.0)
    cb.close()
    assert checkpoints(tmp_path) == ["step-0000006"]  # 3 and 9 fall between updates


def test_a_signal_stops_at_the_step_boundary_with_a_checkpoint(tmp_path, sums_dir, toy_tokenizer):
    cb = make_callback(tmp_path, sums_dir, toy_tokenizer)
    with signals.handled(), signals.deferred():
        report(cb, 1.0)
        os.kill(os.getpid(), signal.SIGTERM)
        assert signals.pending() == signal.SIGTERM  # recorded, not raised, inside a deferred section
        with pytest.raises(signals.Interrupted) as err:
            report(cb, 1.0)
    assert err.value.name == "SIGTERM" and signals.pending() is None
    assert latest_checkpoint(tmp_path).name == "step-0000002"
    cb.close()


def test_a_signal_on_the_last_step_is_left_to_the_engine(tmp_path, sums_dir, toy_tokenizer):
    cb = make_callback(tmp_path, sums_dir, toy_tokenizer, "training.iters=1", "training.save_every=5")
    with signals.handled(), signals.deferred():
        os.kill(os.getpid(), signal.SIGHUP)
        report(cb, 1.0)  # the last step: no extra checkpoint, no raise here
        assert checkpoints(tmp_path) == [] and signals.pending() == signal.SIGHUP
        with pytest.raises(signals.Interrupted, match="SIGHUP"):
            signals.check()
    cb.close()


def test_a_resumed_callback_continues_the_count_and_the_log(tmp_path, sums_dir, toy_tokenizer):
    (tmp_path / METRICS).write_text('{"kind": "train", "step": 4, "train_loss": 0.5}\n')
    state = {"best_val": -1.0, "bad_evals": 1, "last_train_loss": 0.5}  # a best no evaluation can beat
    cb = make_callback(tmp_path, sums_dir, toy_tokenizer, start_step=4, state=state)
    report(cb, 0.4)
    report(cb, 0.3)  # step 6: evaluation and checkpoint
    cb.close()
    assert train_losses(read_metrics(tmp_path / METRICS)) == [0.5, 0.4, 0.3]
    assert cb.state() == {"best_val": -1.0, "bad_evals": 2, "last_train_loss": 0.3}
    assert not (tmp_path / BEST_DIR).exists() and checkpoints(tmp_path) == ["step-0000006"]


def test_without_a_validation_split_nothing_is_evaluated(tmp_path, sums_dir, toy_tokenizer):
    cb = make_callback(tmp_path, sums_dir, toy_tokenizer, val=False)
    assert cb.evaluate() is None
    for _ in range(2):
        report(cb, 1.0)
    cb.close()
    assert val_losses(read_metrics(tmp_path / METRICS)) == [] and cb.best_val is None
