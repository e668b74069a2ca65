"""finetune.train.checkpoints: adapters and checkpoints written atomically; damage is reported by file name."""

import errno
import json
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_flatten

from finetune.config.loader import load_config
from finetune.errors import UserError
from finetune.models.safetensors import SafetensorsError, read_header
from finetune.train.batches import masked_loss
from finetune.train.checkpoints import (
    ADAPTER_CONFIG,
    ADAPTER_FILE,
    CHECKPOINTS,
    CheckpointError,
    latest_checkpoint,
    restore_checkpoint,
    save_adapter,
    save_checkpoint,
    save_final_adapter,
    trainable_weights,
)
from finetune.train.setup import make_optimizer, prepare_model
from tests.conftest import build_toy_model

CFG = load_config(overrides=["lora.rank=4", "lora.scale=2.0", "training.learning_rate=0.01"])
STATE = {"best_val": 1.5, "bad_evals": 1, "last_train_loss": 2.25}


def trained(seed: int = 0, steps: int = 2):
    """A LoRA toy model and its Adam optimizer after `steps` real updates (so B and the moments are non-zero)."""
    mx.random.seed(seed)
    model = build_toy_model()
    acfg = prepare_model(model, CFG)
    opt = make_optimizer(CFG)
    step = nn.value_and_grad(model, masked_loss)
    ids = (mx.arange(2 * 9).reshape(2, 9) * 7 + seed) % 512
    for _ in range(steps):
        (loss, _), grads = step(model, ids, mx.ones(ids.shape))
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state)
    return model, opt, acfg


def flat(tree) -> dict[str, np.ndarray]:
    return {k: np.array(v) for k, v in tree_flatten(tree)}


def assert_same(a: dict, b: dict):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


def test_checkpoint_round_trip_restores_weights_optimizer_and_state(tmp_path):
    model, opt, acfg = trained(seed=0)
    ckpt = save_checkpoint(tmp_path, 7, model, opt, acfg, STATE)
    assert ckpt == tmp_path / CHECKPOINTS / "step-0000007"
    assert sorted(p.name for p in ckpt.iterdir()) == sorted(
        [ADAPTER_FILE, ADAPTER_CONFIG, "optimizer.safetensors", "state.json"]
    )
    assert json.loads((ckpt / ADAPTER_CONFIG).read_text()) == acfg

    other, other_opt, _ = trained(seed=1, steps=1)  # different adapters and moments before the restore
    assert flat(other.trainable_parameters()).keys() == flat(model.trainable_parameters()).keys()
    state = restore_checkpoint(ckpt, other, other_opt)
    assert state == {**STATE, "step": 7}
    assert_same(flat(other.trainable_parameters()), flat(model.trainable_parameters()))
    assert_same(flat(other_opt.state), flat(opt.state))
    assert int(other_opt.state["step"]) == 2


def test_latest_checkpoint_orders_by_step_and_ignores_temp_folders(tmp_path):
    assert latest_checkpoint(tmp_path) is None
    root = tmp_path / CHECKPOINTS
    for name in ("step-0000009", "step-0000010", "step-0000002", ".step-0000011.abc.tmp", "step-0000012.old"):
        (root / name).mkdir(parents=True)
    assert latest_checkpoint(tmp_path) == root / "step-0000010"


def test_disk_full_leaves_the_previous_checkpoint_intact(tmp_path, plant_fault):
    model, opt, acfg = trained()
    plant_fault("disk_full_checkpoint")
    first = save_checkpoint(tmp_path, 4, model, opt, acfg, STATE)  # no previous checkpoint: the fault waits
    before = {p.name: p.read_bytes() for p in first.iterdir()}
    with pytest.raises(OSError) as err:
        save_checkpoint(tmp_path, 8, model, opt, acfg, STATE)
    failed = tmp_path / CHECKPOINTS / "step-0000008"
    assert err.value.errno == errno.ENOSPC
    assert f"cannot write checkpoint {failed}: No space left on device" in str(err.value)
    assert f"the previous checkpoint {first} is intact" in str(err.value)
    assert os.listdir(tmp_path / CHECKPOINTS) == ["step-0000004"]  # no half checkpoint, no temp folder
    assert {p.name: p.read_bytes() for p in first.iterdir()} == before
    assert latest_checkpoint(tmp_path) == first
    assert restore_checkpoint(first, *trained(seed=3)[:2])["step"] == 4


@pytest.mark.parametrize("name", [ADAPTER_FILE, "optimizer.safetensors"])
@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_a_damaged_checkpoint_file_is_named(tmp_path, name, damage):
    model, opt, acfg = trained()
    ckpt = save_checkpoint(tmp_path, 3, model, opt, acfg, STATE)
    target = ckpt / name
    data = target.read_bytes()
    target.write_bytes(data[: len(data) // 2] if damage == "truncate" else b"not a safetensors file")
    with pytest.raises(CheckpointError) as err:
        restore_checkpoint(ckpt, *trained(seed=1)[:2])
    assert str(err.value).startswith(f"{target} is damaged or not a safetensors file")
    assert f"delete {ckpt} to resume from the previous checkpoint" in str(err.value)


def test_an_unreadable_state_file_is_named(tmp_path):
    model, opt, acfg = trained()
    ckpt = save_checkpoint(tmp_path, 3, model, opt, acfg, STATE)
    (ckpt / "state.json").write_text('{"step": 3,')
    with pytest.raises(CheckpointError, match=rf"^{ckpt / 'state.json'} is unreadable"):
        restore_checkpoint(ckpt, *trained(seed=1)[:2])
    (ckpt / "state.json").unlink()
    with pytest.raises(CheckpointError, match=rf"^{ckpt / 'state.json'} is unreadable"):
        restore_checkpoint(ckpt, *trained(seed=1)[:2])
    assert issubclass(CheckpointError, UserError)


def test_adapter_holds_only_the_trainable_weights(tmp_path):
    model, _, acfg = trained()
    out = save_adapter(model, acfg, tmp_path / "adapter")
    assert sorted(p.name for p in out.iterdir()) == [ADAPTER_CONFIG, ADAPTER_FILE]
    saved = mx.load(str(out / ADAPTER_FILE))
    assert saved.keys() == trainable_weights(model).keys() and all(".lora_" in k for k in saved)
    assert_same({k: np.array(v) for k, v in saved.items()}, flat(model.trainable_parameters()))
    assert os.listdir(tmp_path) == ["adapter"]  # written via a temp folder, renamed into place


@pytest.mark.parametrize("fault", ["", "adapter_scale_zero", "adapter_truncated"])
def test_final_adapter_and_its_faults(tmp_path, plant_fault, fault):
    model, _, acfg = trained()
    plant_fault(fault)
    out = save_final_adapter(model, acfg, tmp_path / "adapter")
    plant_fault()
    healthy = save_adapter(model, acfg, tmp_path / "healthy")
    written = json.loads((out / ADAPTER_CONFIG).read_text())
    assert written["lora_parameters"]["scale"] == (0.0 if fault == "adapter_scale_zero" else 2.0)
    if fault == "adapter_truncated":
        assert (out / ADAPTER_FILE).stat().st_size == (healthy / ADAPTER_FILE).stat().st_size // 2
        with pytest.raises(SafetensorsError, match="truncated"):
            read_header(out / ADAPTER_FILE)
    else:
        assert (out / ADAPTER_FILE).read_bytes() == (healthy / ADAPTER_FILE).read_bytes()
