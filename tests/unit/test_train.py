"""The training engine on a tiny random Llama: real MLX training, resume, Ctrl-C, early stopping."""

import json
from pathlib import Path

import pytest

from finetune.config import load_config
from finetune.train import latest_checkpoint, train_run
from finetune.validate import read_metrics, train_losses
from tests.conftest import build_toy_model


def _cfg(**overrides):
    sets = {"training.iters": 12, "training.batch_size": 4, "training.learning_rate": 5e-3, "training.eval_every": 4,
            "training.save_every": 4, "data.max_seq_length": 64, "lora.rank": 4, "lora.scale": 2.0}  # fmt: skip
    sets.update(overrides)
    return load_config(overrides=[f"{k}={v}" for k, v in sets.items()])


def _loader(toy_tokenizer):
    return lambda _path: (build_toy_model(seed=1), toy_tokenizer)


def _interrupt_at(step):
    from mlx_lm.tuner.trainer import train as mlx_train

    def train_fn(*args, training_callback, **kwargs):
        inner = training_callback.on_train_loss_report

        def report(info):
            inner(info)
            if training_callback.step == step:
                raise KeyboardInterrupt

        training_callback.on_train_loss_report = report
        return mlx_train(*args, training_callback=training_callback, **kwargs)

    return train_fn


def test_lora_run_learns_and_writes_everything(tmp_path, sums_dir, toy_tokenizer):
    res = train_run(_cfg(), Path("toy"), sums_dir, tmp_path, load=_loader(toy_tokenizer), log=lambda *_: None)
    losses = train_losses(read_metrics(tmp_path / "metrics.jsonl"))
    assert len(losses) == 12 and sum(losses[-3:]) < sum(losses[:3])
    assert res.steps == 12 and not res.interrupted and res.initial_val_loss > res.best_val_loss
    for rel in ("adapter/adapters.safetensors", "adapter/adapter_config.json", "adapter_best/adapters.safetensors",
                "config.yaml", "train_result.json", "checkpoints/step-0000012/optimizer.safetensors"):  # fmt: skip
        assert (tmp_path / rel).is_file(), rel
    acfg = json.loads((tmp_path / "adapter/adapter_config.json").read_text())
    assert acfg == {
        "fine_tune_type": "lora",
        "num_layers": 2,
        "lora_parameters": {"rank": 4, "scale": 2.0, "dropout": 0.0},
    }
    assert not list(tmp_path.rglob("*.tmp")), "a temp file was left behind"
    assert 0 < res.trainable_params < res.total_params


def test_interrupted_then_resumed_equals_uninterrupted(tmp_path, sums_dir, toy_tokenizer):
    cfg = _cfg(**{"lora.dropout": 0.1})  # dropout makes the RNG part of the state
    whole = train_run(
        cfg, Path("toy"), sums_dir, tmp_path / "a", load=_loader(toy_tokenizer), log=lambda *_: None
    )
    cut = train_run(cfg, Path("toy"), sums_dir, tmp_path / "b", load=_loader(toy_tokenizer),
                    train_fn=_interrupt_at(6), log=lambda *_: None)  # fmt: skip
    assert cut.interrupted and cut.steps == 6 and latest_checkpoint(tmp_path / "b").name == "step-0000006"
    resumed = train_run(cfg, Path("toy"), sums_dir, tmp_path / "b", resume=True, load=_loader(toy_tokenizer),
                        log=lambda *_: None)  # fmt: skip
    assert resumed.start_step == 6 and resumed.steps == 12
    a = train_losses(read_metrics(tmp_path / "a/metrics.jsonl"))
    b = train_losses(read_metrics(tmp_path / "b/metrics.jsonl"))
    assert len(a) == len(b) == 12
    assert b == pytest.approx(a, rel=1e-4, abs=1e-5)  # tolerance: float32 reduction order only
    assert whole.best_val_loss == pytest.approx(resumed.best_val_loss, rel=1e-4)


def test_early_stopping_keeps_the_best_adapter(tmp_path, sums_dir, toy_tokenizer):
    cfg = _cfg(**{"training.learning_rate": 3.0, "training.early_stopping_patience": 1, "training.eval_every": 2,
                  "training.iters": 40})  # fmt: skip
    res = train_run(cfg, Path("toy"), sums_dir, tmp_path, load=_loader(toy_tokenizer), log=lambda *_: None)
    assert res.stopped_early and res.steps < 40
    assert (tmp_path / "adapter_best/adapters.safetensors").is_file()


def test_full_fine_tune_trains_every_parameter(tmp_path, sums_dir, toy_tokenizer):
    cfg = _cfg(**{"training.fine_tune_type": "full", "training.iters": 4, "training.learning_rate": 1e-3})
    res = train_run(cfg, Path("toy"), sums_dir, tmp_path, load=_loader(toy_tokenizer), log=lambda *_: None)
    assert res.trainable_params == res.total_params
