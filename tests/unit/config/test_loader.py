"""finetune.config.loader: profiles, precedence, YAML with line numbers, and error messages naming file:line: key."""

import os
from pathlib import Path

import pytest

from finetune.config import loader
from finetune.config.loader import (
    CONFIG_DIR,
    ConfigError,
    list_profiles,
    load_config,
    load_file,
    parse_set,
    save_config,
)
from finetune.config.schema import RunConfig
from finetune.errors import UserError


def write(tmp_path: Path, text: str, name: str = "user.yaml") -> Path:
    p = tmp_path / name
    p.write_text(text)
    return p


def test_every_profile_loads_and_differs_from_base():
    base = load_config()
    assert {"quick", "default", "low-memory", "quality"} <= set(list_profiles())
    for name in list_profiles():
        cfg = load_config(name)
        assert cfg.profile == name
        assert cfg.to_dict() != base.to_dict(), f"{name} changes nothing"


def test_low_memory_profile_is_smaller_than_default():
    low, default = load_config("low-memory"), load_config("default")
    assert low.lora.rank < default.lora.rank
    assert low.training.batch_size == 1 and low.training.grad_checkpoint


def test_precedence_base_profile_user_set(tmp_path):
    user = write(tmp_path, "training:\n  iters: 7\n  batch_size: 2\n")
    cfg = load_config("quick", user, ["training.batch_size=3"])
    assert cfg.training.iters == 7  # user over profile (quick sets 30)
    assert cfg.training.batch_size == 3  # --set over user
    assert cfg.lora.num_layers == 8  # profile over base
    assert cfg.lora.rank == 8  # base


def test_scientific_notation_is_a_float(tmp_path):
    cfg = load_config(None, write(tmp_path, "training:\n  learning_rate: 1e-5\n"))
    assert isinstance(cfg.training.learning_rate, float) and cfg.training.learning_rate == 1e-5
    assert parse_set("training.learning_rate=2e-4") == (["training", "learning_rate"], 2e-4)


def test_unknown_key_names_file_line_and_nearest(tmp_path):
    path = write(tmp_path, "lora:\n  rank: 4\n  lora_layers: 4\n")
    with pytest.raises(ConfigError) as err:
        load_config("quick", path)
    assert str(err.value) == f"{path}:3: lora.lora_layers: unknown key; did you mean num_layers?"


def test_misspelled_section_and_set_key():
    with pytest.raises(ConfigError, match=r"trainig: unknown key; did you mean training\?"):
        load_config(overrides=["trainig.iters=3"])
    with pytest.raises(
        ConfigError, match=r"--set training.itrs=3: training.itrs: unknown key; did you mean iters\?"
    ):
        load_config(overrides=["training.itrs=3"])


def test_wrong_type_names_key_and_file(tmp_path):
    path = write(tmp_path, "model:\n  name: x\ntraining:\n  learning_rate: fast\n")
    with pytest.raises(ConfigError) as err:
        load_config(None, path)
    assert str(err.value).startswith(f"{path}:4: training.learning_rate: Input should be a valid number")


def test_bad_yaml_names_line(tmp_path):
    path = write(tmp_path, "training:\n  iters: [1,\n")
    with pytest.raises(ConfigError, match=rf"{path}:\d+: invalid YAML"):
        load_config(None, path)


def test_alpha_and_scale_convert_both_ways(tmp_path):
    cfg = load_config(None, write(tmp_path, "lora:\n  rank: 16\n  alpha: 32\n"))
    assert cfg.lora.scale == 2.0 and cfg.lora.alpha == 32.0
    cfg = load_config(None, write(tmp_path, "lora:\n  rank: 8\n  scale: 4\n"))
    assert cfg.lora.alpha == 32.0
    # a later layer's alpha replaces an inherited scale (quality inherits base's scale 20)
    assert load_config("quality").lora.scale == 32 / 16


def test_alpha_and_scale_together_is_an_error(tmp_path):
    path = write(tmp_path, "lora:\n  rank: 8\n  alpha: 16\n  scale: 2\n")
    with pytest.raises(ConfigError, match=r"user.yaml:3: lora: give either scale .* or alpha .*not both"):
        load_config(None, path)


def test_save_then_load_round_trips(tmp_path):
    for name in list_profiles():
        cfg = load_config(name, overrides=["lora.alpha=24"])
        path = save_config(cfg, tmp_path / f"{name}.yaml")
        assert load_file(path) == cfg


def test_validation_errors_for_ranges(tmp_path):
    with pytest.raises(ConfigError, match="data.splits: splits must be three shares above 0 .* summing to 1"):
        load_config(overrides=["data.splits=[0.5, 0.1, 0.1]"])
    with pytest.raises(ConfigError, match=r"each needs a row\) summing to 1, got \[0.9, 0.1, 0.0\]"):
        load_config(overrides=["data.splits=[0.9, 0.1, 0]"])  # it passed here and failed at the data stage
    with pytest.raises(ConfigError, match="lora.num_layers"):
        load_config(overrides=["lora.num_layers=0"])


def test_unknown_profile_lists_available():
    with pytest.raises(ConfigError, match="unknown profile 'fast'; available: default"):
        load_config("fast")


def test_profile_inheritance_loop_is_refused(tmp_path):
    (tmp_path / "base.yaml").write_text("{}\n")
    (tmp_path / "a.yaml").write_text("extends: b\n")
    (tmp_path / "b.yaml").write_text("extends: a\n")
    with pytest.raises(ConfigError, match="inheritance loops: a -> b -> a"):
        load_config("a", config_dir=tmp_path)


def test_defaults_are_a_valid_config():
    assert RunConfig().training.fine_tune_type == "lora"


def test_set_value_that_is_not_yaml_is_taken_as_text():
    assert parse_set("deploy.template={{ .Prompt }}") == (["deploy", "template"], "{{ .Prompt }}")
    assert load_config(overrides=["deploy.template={{ .Prompt }}"]).deploy.template == "{{ .Prompt }}"


def test_profiles_ship_in_the_package_and_the_repo_links_them():
    if "FT_CONFIG_DIR" not in os.environ:
        assert Path(loader.__file__).parent / "profiles" == CONFIG_DIR
    assert (CONFIG_DIR / "base.yaml").is_file() and "base" not in list_profiles()
    repo_configs = Path(__file__).resolve().parents[3] / "configs"
    assert sorted(p.name for p in repo_configs.glob("*.yaml")) == sorted(
        p.name for p in CONFIG_DIR.glob("*.yaml")
    )


def test_config_error_is_a_user_error():
    with pytest.raises(UserError):
        load_config("fast")


def test_user_file_may_name_its_profile(tmp_path):
    path = write(tmp_path, "extends: quick\ntraining:\n  iters: 9\n")
    cfg = load_config(None, path)
    assert cfg.profile == "quick" and cfg.training.iters == 9
    assert cfg.lora.num_layers == load_config("quick").lora.num_layers  # the rest comes from quick
    assert load_file(path) == cfg
    with pytest.raises(ConfigError, match=rf"{path}:1: extends 'quick', but --profile 'default' was given"):
        load_config("default", path)


def test_known_aliases_get_a_direct_hint(tmp_path):
    path = write(tmp_path, "training:\n  lr: 0.1\n")
    with pytest.raises(
        ConfigError, match=rf"^{path}:2: training.lr: unknown key; did you mean learning_rate\?$"
    ):
        load_config(None, path)
    path = write(tmp_path, "training:\n  zzzz: 1\n")
    with pytest.raises(
        ConfigError, match="training.zzzz: unknown key; valid keys: fine_tune_type, optimizer"
    ):
        load_config(None, path)


def test_bad_set_syntax_and_files(tmp_path):
    with pytest.raises(ConfigError, match="expected key=value"):
        parse_set("training.iters")
    with pytest.raises(ConfigError, match="empty key"):
        parse_set("=3")
    with pytest.raises(ConfigError, match=r"nope.yaml: config file not found"):
        load_config(None, tmp_path / "nope.yaml")
    path = write(tmp_path, "- a\n- b\n")
    with pytest.raises(ConfigError, match=rf"{path}: a config must be a mapping of sections, got list"):
        load_config(None, path)


def test_empty_user_file_changes_nothing(tmp_path):
    assert load_config("quick", write(tmp_path, "")) == load_config("quick")


def test_set_value_types_follow_yaml():
    assert parse_set("training.grad_checkpoint=true") == (["training", "grad_checkpoint"], True)
    assert parse_set("lora.keys=[self_attn.q_proj]") == (["lora", "keys"], ["self_attn.q_proj"])
    assert parse_set("model.name=") == (["model", "name"], "")
    cfg = load_config(overrides=["lora.keys=[self_attn.q_proj, self_attn.v_proj]", "training.iters=5"])
    assert cfg.lora.keys == ["self_attn.q_proj", "self_attn.v_proj"] and cfg.training.iters == 5


def test_saved_config_is_plain_yaml_of_the_resolved_values(tmp_path):
    cfg = load_config("quality")
    path = save_config(cfg, tmp_path / "deep" / "config.yaml")
    text = path.read_text()
    assert "alpha" not in text and "scale: 2.0" in text  # the resolved scale, not the alias
    assert load_file(path).lora.alpha == cfg.lora.alpha


@pytest.mark.parametrize(
    ("given", "suggested"),
    [
        ("data.path", "did you mean source? (a file, a saved dataset folder or a Hub id)"),  # not `template`
        ("training.num_train_epochs", "did you mean iters? (optimizer steps, not epochs"),  # not trim_batches
        ("num_train_epochs", "did you mean training.iters?"),
        ("training.max_seq_len", "did you mean data.max_seq_length?"),
        ("data.train_on_inputs", "did you mean mask_prompt? (the opposite sense"),
    ],
)
def test_names_other_tools_use_are_matched_by_meaning_not_spelling(given, suggested):
    with pytest.raises(ConfigError) as err:
        load_config("quick", overrides=[f"{given}=1"])
    assert suggested in str(err.value)


def test_relative_paths_in_a_users_yaml_are_relative_to_that_yaml(tmp_path, monkeypatch):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    (project / "data" / "mine.jsonl").write_text("{}\n")
    (project / "ft.yaml").write_text(
        "data:\n  source: data/mine.jsonl\nmodel:\n  name: ./models/base\noutput_dir: ./runs\n"
    )
    monkeypatch.chdir(tmp_path)  # elsewhere: the cwd used to decide
    cfg = load_config("quick", project / "ft.yaml")
    assert cfg.data.source == str(project / "data" / "mine.jsonl")
    assert (cfg.model.name, cfg.output_dir) == (str(project / "models" / "base"), str(project / "runs"))
    (project / "ft.yaml").write_text(
        "data:\n  source: builtin:geography\nmodel:\n  name: HuggingFaceTB/SmolLM2-135M\n"
    )
    cfg = load_config("quick", project / "ft.yaml")
    assert (cfg.data.source, cfg.model.name) == ("builtin:geography", "HuggingFaceTB/SmolLM2-135M")
