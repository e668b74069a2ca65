"""A run directory owns its config: reruns use it, differing options are refused, overrides are recorded."""

from __future__ import annotations

import json

import pytest

from finetune.config.loader import ConfigError, load_config, save_config
from finetune.stages.rundir import differences, new_run_dir, own_config, resume_command
from finetune.system.owned import MARKER, NotOwned


def test_a_new_run_saves_its_config_and_a_rerun_without_options_uses_it(tmp_path):
    cfg = load_config("quick")
    assert own_config(tmp_path, cfg) == cfg
    assert own_config(tmp_path, None) == cfg
    assert own_config(tmp_path, load_config("quick")) == cfg, "the same options are accepted"


def test_differing_options_are_refused_with_the_keys_and_the_command_to_use(tmp_path):
    own_config(tmp_path, load_config("quick"))
    with pytest.raises(ConfigError) as err:
        own_config(
            tmp_path, load_config("quick", overrides=["training.learning_rate=1e-3"]), command="pipeline"
        )
    assert "training.learning_rate: run has 0.0002, given 0.001" in str(err.value)
    assert f"finetune pipeline --run-dir {tmp_path} --resume" in str(err.value)


def test_overrides_change_only_allowed_keys_and_are_recorded(tmp_path):
    own_config(tmp_path, load_config("quick"))
    cfg = own_config(tmp_path, None, ["training.iters=60", "gates.loss_drop=0.1"])
    assert cfg.training.iters == 60 and cfg.gates.loss_drop == 0.1
    assert own_config(tmp_path, None).training.iters == 60, "the saved config now says 60"
    log = [json.loads(line) for line in (tmp_path / "overrides.jsonl").read_text().splitlines()]
    assert [(r["key"], r["old"], r["new"]) for r in log] == [
        ("training.iters", 48, 60),
        ("gates.loss_drop", 0.05, 0.1),
    ]
    with pytest.raises(ConfigError, match="lora.rank changes what this run trains"):
        own_config(tmp_path, None, ["lora.rank=4"])
    with pytest.raises(ConfigError, match="new run"):
        own_config(tmp_path / "fresh", load_config("quick"), ["training.iters=5"])
    assert not (tmp_path / "fresh").exists(), "a refused override writes nothing"


def test_iters_cannot_be_overridden_under_a_schedule_that_depends_on_it(tmp_path):
    own_config(tmp_path, load_config("quality"))
    with pytest.raises(ConfigError, match="cosine schedule depends on training.iters"):
        own_config(tmp_path, None, ["training.iters=900"])


def test_a_folder_without_config_is_not_a_run(tmp_path):
    with pytest.raises(ConfigError, match="not a FineTune run directory"):
        own_config(tmp_path, None)


def test_a_config_yaml_without_the_marker_is_not_taken_for_a_run(tmp_path):
    save_config(load_config("quick"), tmp_path / "config.yaml")  # a user's own project config
    with pytest.raises(ConfigError, match=f"its config.yaml was not written by FineTune \\(no {MARKER}\\)"):
        own_config(tmp_path, None)
    with pytest.raises(NotOwned, match="is not empty \\(config.yaml\\)"):
        own_config(tmp_path, load_config("quick"))
    assert [p.name for p in tmp_path.iterdir()] == ["config.yaml"]


def test_new_run_dirs_started_in_one_second_never_share_a_folder(tmp_path):
    cfg = load_config("quick")
    made = {new_run_dir(cfg, tmp_path) for _ in range(3)}
    assert len(made) == 3 and all(p.is_dir() and not list(p.iterdir()) for p in made)
    assert all(p.name.startswith("quick-") for p in made)


def test_helpers(tmp_path):
    cfg = load_config("quick")
    assert differences(cfg, cfg) == []
    assert resume_command("run", tmp_path) == f"finetune run --run-dir {tmp_path} --resume"
