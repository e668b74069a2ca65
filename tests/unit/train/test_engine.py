"""finetune.train.engine: real MLX training of a tiny random Llama: artifacts, resume, signals, early stopping."""

import json
import os
import signal
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from finetune.config.loader import load_config
from finetune.system import signals
from finetune.system.jsonl import read_jsonl
from finetune.train.checkpoints import RESULT, latest_checkpoint
from finetune.train.engine import train_run
from finetune.train.metrics import METRICS, read_metrics, train_losses, val_losses
from finetune.train.splits import TOKENS, load_split
from tests.conftest import build_toy_model


def _cfg(**overrides):
    sets = {"training.iters": 12, "training.batch_size": 4, "training.learning_rate": 5e-3, "training.eval_every": 4,
            "training.save_every": 4, "data.max_seq_length": 64, "lora.rank": 4, "lora.scale": 2.0}  # fmt: skip
    sets.update(overrides)
    return load_config(overrides=[f"{k}={v}" for k, v in sets.items()])


def _loader(toy_tokenizer):
    return lambda _path: (build_toy_model(seed=1), toy_tokenizer)


def run(cfg, sums_dir, run_dir, toy_tokenizer, **kw):
    return train_run(
        cfg, Path("toy"), sums_dir, run_dir, load=_loader(toy_tokenizer), log=lambda *_: None, **kw
    )


def _train_fn(before=None, after=None):
    """mlx-lm's real train() with hooks around each step's report (an injected trainer, nothing patched).

    mlx-lm reports step k after its update is evaluated: `before(cb)` runs between update k and its report
    (cb.step == k - 1 there), `after(cb)` once step k is logged, evaluated and checkpointed (cb.step == k).
    """
    from mlx_lm.tuner.trainer import train as mlx_train

    def train_fn(*args, training_callback, **kwargs):
        inner = training_callback.on_train_loss_report

        def report(info):
            if before:
                before(training_callback)
            inner(info)
            if after:
                after(training_callback)

        training_callback.on_train_loss_report = report
        return mlx_train(*args, training_callback=training_callback, **kwargs)

    return train_fn


def _keyboard_interrupt(step, *, reported=True):
    """Ctrl-C with no handlers installed, once update `step` is done: after its report, or before it."""

    def interrupt(cb):
        if cb.step == (step if reported else step - 1):
            raise KeyboardInterrupt

    return _train_fn(after=interrupt) if reported else _train_fn(before=interrupt)


def _signal_before(step, signum):
    def send(cb):
        if cb.step == step - 1:
            os.kill(os.getpid(), signum)

    return _train_fn(before=send)


def losses(run_dir):
    return train_losses(read_metrics(run_dir / METRICS))


def loaded_adapter(folder):
    return {k: np.array(v) for k, v in mx.load(str(folder / "adapters.safetensors")).items()}


@pytest.fixture(scope="module")
def whole(tmp_path_factory, sums_dir, toy_tokenizer):
    """One uninterrupted run with dropout (the RNG is then part of what resume must restore)."""
    run_dir = tmp_path_factory.mktemp("whole")
    return run(_cfg(**{"lora.dropout": 0.1}), sums_dir, run_dir, toy_tokenizer), run_dir


def test_lora_run_learns_and_writes_everything(tmp_path, sums_dir, toy_tokenizer):
    seen = []
    res = run(_cfg(), sums_dir, tmp_path, toy_tokenizer, on_trained=lambda m, t: seen.append((m, t)))
    train = losses(tmp_path)
    assert len(train) == 12 and sum(train[-3:]) < sum(train[:3])
    assert res.steps == 12 and res.start_step == 0 and res.interrupted is None and not res.stopped_early
    assert res.initial_val_loss > res.best_val_loss and res.final_train_loss == pytest.approx(train[-1])
    assert [s for s, _ in val_losses(read_metrics(tmp_path / METRICS))] == [0, 4, 8, 12]
    for rel in ("adapter/adapters.safetensors", "adapter/adapter_config.json", "adapter_best/adapters.safetensors",
                "adapter_init/adapters.safetensors", TOKENS, RESULT, "checkpoints/step-0000012/optimizer.safetensors"):  # fmt: skip
        assert (tmp_path / rel).is_file(), rel
    assert not (tmp_path / "config.yaml").exists()  # the tier writes the run's config, not the engine
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "step-0000004",
        "step-0000008",
        "step-0000012",
    ]
    acfg = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert acfg == {
        "fine_tune_type": "lora",
        "num_layers": 2,
        "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0},
    }
    assert not list(tmp_path.rglob("*.tmp")) and not (tmp_path / ".mlx_lm_final.safetensors").exists()
    assert 0 < res.trainable_params < res.total_params and res.peak_memory_bytes > 0
    assert json.loads((tmp_path / RESULT).read_text()) == json.loads(json.dumps(res.to_dict()))
    assert res.adapter_dir == str(tmp_path / "adapter") and res.best_adapter_dir == str(
        tmp_path / "adapter_best"
    )

    # on_trained saw the trained model still in memory (and the tokenizer it was loaded with)
    ((model, tokenizer),) = seen
    assert tokenizer is toy_tokenizer
    in_memory = {k: np.array(v) for k, v in tree_flatten(model.trainable_parameters())}
    final = loaded_adapter(tmp_path / "adapter")
    assert in_memory.keys() == final.keys() and all(np.array_equal(in_memory[k], final[k]) for k in final)


def test_step_zero_adapter_and_recorded_tokens(tmp_path, sums_dir, toy_tokenizer):
    run(_cfg(**{"training.iters": 2, "training.eval_every": 2}), sums_dir, tmp_path, toy_tokenizer)
    init, final = loaded_adapter(tmp_path / "adapter_init"), loaded_adapter(tmp_path / "adapter")
    assert init.keys() == final.keys()
    b_keys = [k for k in init if k.endswith("lora_b")]
    assert b_keys and all(not init[k].any() for k in b_keys)  # LoRA starts with B = 0 ...
    assert any(final[k].any() for k in b_keys)  # ... and training moved it
    recorded = json.loads((tmp_path / TOKENS).read_text())
    split = load_split(sums_dir / "train.jsonl", toy_tokenizer, 64, True)
    assert recorded["source"] == str(sums_dir / "train.jsonl")
    assert recorded["rows"] == [
        {"row": r, "ids": ids, "mask": mask} for r, (ids, mask) in zip(split.rows, split.items, strict=True)
    ]


def test_mask_prompt_ignored_fault_is_what_training_records(tmp_path, sums_dir, toy_tokenizer, plant_fault):
    plant_fault("mask_prompt_ignored")
    run(_cfg(**{"training.iters": 1, "training.eval_every": 1}), sums_dir, tmp_path, toy_tokenizer)
    rows = json.loads((tmp_path / TOKENS).read_text())["rows"]
    assert rows and all(r["mask"] == [1] * len(r["ids"]) for r in rows)


def test_keyboard_interrupt_checkpoints_and_resume_equals_uninterrupted(
    tmp_path, whole, sums_dir, toy_tokenizer
):
    cfg = _cfg(**{"lora.dropout": 0.1})
    with pytest.raises(KeyboardInterrupt):
        run(cfg, sums_dir, tmp_path, toy_tokenizer, train_fn=_keyboard_interrupt(6))
    assert latest_checkpoint(tmp_path).name == "step-0000006"  # not on the save schedule: the interrupt's
    cut = json.loads((tmp_path / RESULT).read_text())
    assert cut["interrupted"] == "SIGINT" and cut["steps"] == 6
    assert not (tmp_path / "adapter").exists()  # no final adapter for an unfinished run

    resumed = run(cfg, sums_dir, tmp_path, toy_tokenizer, resume=True)
    assert resumed.start_step == 6 and resumed.steps == 12 and resumed.interrupted is None
    whole_result, whole_dir = whole
    a, b = losses(whole_dir), losses(tmp_path)
    assert len(a) == len(b) == 12
    assert b == pytest.approx(a, rel=1e-4, abs=1e-5)  # tolerance: float32 reduction order only
    assert whole_result.best_val_loss == pytest.approx(resumed.best_val_loss, rel=1e-4)
    # the validation_loss gate reads the loss before training from a resumed run's result too
    assert resumed.initial_val_loss == whole_result.initial_val_loss is not None
    assert json.loads((tmp_path / RESULT).read_text())["initial_val_loss"] == resumed.initial_val_loss


def test_keyboard_interrupt_between_an_update_and_its_report_keeps_the_log_whole(
    tmp_path, whole, sums_dir, toy_tokenizer
):
    """The likeliest Ctrl-C: during step 7's evaluation (most of a step), raised once update 7 is done but
    before mlx-lm reports it. Resuming must still give every step's loss, as the uninterrupted run does."""
    cfg = _cfg(**{"lora.dropout": 0.1})
    with pytest.raises(KeyboardInterrupt):
        run(cfg, sums_dir, tmp_path, toy_tokenizer, train_fn=_keyboard_interrupt(7, reported=False))
    run(cfg, sums_dir, tmp_path, toy_tokenizer, resume=True)
    _, whole_dir = whole
    got, expected = read_metrics(tmp_path / METRICS), read_metrics(whole_dir / METRICS)
    assert [r["step"] for r in got if r["kind"] == "train"] == list(range(1, 13))
    assert train_losses(got) == pytest.approx(train_losses(expected), rel=1e-4, abs=1e-5)


def test_resume_from_an_evaluation_step_keeps_the_whole_validation_log(
    tmp_path, whole, sums_dir, toy_tokenizer
):
    """Interrupted right after step 8 (evaluated and checkpointed): the resumed log must equal the whole run's."""
    cfg = _cfg(**{"lora.dropout": 0.1})
    with pytest.raises(KeyboardInterrupt):
        run(cfg, sums_dir, tmp_path, toy_tokenizer, train_fn=_keyboard_interrupt(8))
    assert [s for s, _ in val_losses(read_metrics(tmp_path / METRICS))] == [0, 4, 8]
    run(cfg, sums_dir, tmp_path, toy_tokenizer, resume=True)
    _, whole_dir = whole
    expected = val_losses(read_metrics(whole_dir / METRICS))
    got = val_losses(read_metrics(tmp_path / METRICS))
    assert [s for s, _ in got] == [s for s, _ in expected] == [0, 4, 8, 12]
    assert [v for _, v in got] == pytest.approx([v for _, v in expected], rel=1e-4)


def test_a_signal_stops_training_with_a_resumable_checkpoint(tmp_path, sums_dir, toy_tokenizer):
    cfg = _cfg(**{"training.iters": 8})
    with signals.handled(), pytest.raises(signals.Interrupted) as err:
        run(cfg, sums_dir, tmp_path, toy_tokenizer, train_fn=_signal_before(3, signal.SIGTERM))
    assert err.value.name == "SIGTERM" and err.value.exit_code == 128 + signal.SIGTERM
    assert latest_checkpoint(tmp_path).name == "step-0000003"
    result = json.loads((tmp_path / RESULT).read_text())
    assert result["interrupted"] == "SIGTERM" and result["steps"] == 3
    assert len(losses(tmp_path)) == 3
    resumed = run(cfg, sums_dir, tmp_path, toy_tokenizer, resume=True)
    assert resumed.start_step == 3 and resumed.steps == 8 and len(losses(tmp_path)) == 8


def test_resume_without_a_checkpoint_starts_over(tmp_path, sums_dir, toy_tokenizer):
    (tmp_path / METRICS).write_text('{"kind": "train", "step": 5, "train_loss": 9.0}\n')
    res = run(
        _cfg(**{"training.iters": 2, "training.eval_every": 2}),
        sums_dir,
        tmp_path,
        toy_tokenizer,
        resume=True,
    )
    assert res.start_step == 0 and res.steps == 2
    assert 9.0 not in losses(tmp_path) and len(losses(tmp_path)) == 2


def test_a_fresh_run_replaces_an_old_log(tmp_path, sums_dir, toy_tokenizer):
    (tmp_path / METRICS).write_text('{"kind": "train", "step": 1, "train_loss": 9.0}\n')
    run(_cfg(**{"training.iters": 2, "training.eval_every": 2}), sums_dir, tmp_path, toy_tokenizer)
    assert 9.0 not in losses(tmp_path) and len(losses(tmp_path)) == 2


def test_disk_full_while_checkpointing_stops_the_run_naming_the_checkpoint(
    tmp_path, sums_dir, toy_tokenizer, plant_fault
):
    plant_fault("disk_full_checkpoint")
    with pytest.raises(OSError, match=r"cannot write checkpoint .*step-0000008: No space left on device"):
        run(_cfg(), sums_dir, tmp_path, toy_tokenizer)
    assert latest_checkpoint(tmp_path).name == "step-0000004"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["step-0000004"]


def test_early_stopping_keeps_the_best_adapter(tmp_path, sums_dir, toy_tokenizer):
    cfg = _cfg(**{"training.learning_rate": 3.0, "training.early_stopping_patience": 1, "training.eval_every": 2,
                  "training.iters": 40})  # fmt: skip
    res = run(cfg, sums_dir, tmp_path, toy_tokenizer)
    assert res.stopped_early and res.steps < 40 and res.steps % 2 == 0
    assert (tmp_path / "adapter_best/adapters.safetensors").is_file() and (tmp_path / "adapter").is_dir()
    vals = val_losses(read_metrics(tmp_path / METRICS))
    assert res.best_val_loss == min(v for _, v in vals) and vals[-1][1] >= res.best_val_loss


def test_full_fine_tune_trains_every_parameter(tmp_path, sums_dir, toy_tokenizer):
    cfg = _cfg(**{"training.fine_tune_type": "full", "training.iters": 4, "training.learning_rate": 1e-3})
    res = run(cfg, sums_dir, tmp_path, toy_tokenizer)
    assert res.trainable_params == res.total_params
    assert json.loads((tmp_path / "adapter/adapter_config.json").read_text())["fine_tune_type"] == "full"


def test_lr_zero_fault_leaves_the_adapter_where_it_started(tmp_path, sums_dir, toy_tokenizer, plant_fault):
    plant_fault("lr_zero")
    run(_cfg(**{"training.iters": 3, "training.eval_every": 3}), sums_dir, tmp_path, toy_tokenizer)
    init, final = loaded_adapter(tmp_path / "adapter_init"), loaded_adapter(tmp_path / "adapter")
    assert all(np.array_equal(init[k], final[k]) for k in init)
    assert {r["learning_rate"] for r in read_metrics(tmp_path / METRICS) if r["kind"] == "train"} == {0.0}


def test_prepared_splits_are_read_not_prepared(tmp_path, sums_dir, toy_tokenizer):
    data = tmp_path / "data"
    data.mkdir()
    rows = read_jsonl(sums_dir / "train.jsonl")
    (data / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))  # no valid.jsonl
    res = run(_cfg(**{"training.iters": 2}), data, tmp_path / "run", toy_tokenizer)
    assert res.initial_val_loss is None and res.best_val_loss is None and res.best_adapter_dir is None
    assert val_losses(read_metrics(tmp_path / "run" / METRICS)) == []
    with pytest.raises(FileNotFoundError, match="train.jsonl"):
        run(_cfg(), tmp_path / "nowhere", tmp_path / "run2", toy_tokenizer)
