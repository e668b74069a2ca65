"""finetune.models.resolve: a model spec becomes a loadable local folder, or ModelUnavailable says why."""

import json
from pathlib import Path

import numpy as np
import pytest
from safetensors.numpy import save_file

from finetune.models.cache import ModelUnavailable
from finetune.models.convert import fix_config_for_mlx
from finetune.models.resolve import missing_files, read_config, resolve_model, rope_problem
from finetune.models.tiny import TINY


def no_download(repo_id, cache):
    raise AssertionError("tests must never reach the network")


def write_folder(path: Path, config: dict | str | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    cfg = config if config is not None else {"model_type": "llama", "rope_theta": 1e4}
    (path / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    save_file({"w": np.zeros((2, 2), np.float32)}, str(path / "model.safetensors"))
    (path / "tokenizer.json").write_text("{}")
    (path / "tokenizer_config.json").write_text("{}")
    return path


def test_truncated_weights_are_bad_input_naming_the_file(tmp_path):
    folder = write_folder(tmp_path / "m")
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-5])  # an interrupted download
    with pytest.raises(
        ModelUnavailable, match=rf"model folder {folder}: {weights}: .* truncated; download or copy it again"
    ):
        resolve_model(str(folder), downloader=no_download)


def test_local_folder_resolves(tmp_path):
    folder = write_folder(tmp_path / "m")
    got = resolve_model(str(folder), downloader=no_download)
    assert got.source == "local" and got.path == folder.resolve() and got.config["model_type"] == "llama"
    assert got.name == str(folder)


def test_terms_recorded_in_a_built_folders_marker_travel_with_the_model(tmp_path):
    from finetune.models.cache import MARKER

    folder = write_folder(tmp_path / "m")
    assert resolve_model(str(folder), downloader=no_download).license is None
    (folder / MARKER).write_text(json.dumps({"spec": "x", "license": "Gemma Terms of Use"}))
    assert resolve_model(str(folder), downloader=no_download).license == "Gemma Terms of Use"


def test_local_folder_lists_everything_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailable) as err:
        resolve_model(str(tmp_path / "empty"), downloader=no_download)
    for item in ("config.json", "*.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert item in str(err.value)
    with pytest.raises(ModelUnavailable, match="does not exist"):
        resolve_model(str(tmp_path / "nowhere"), downloader=no_download)
    with pytest.raises(ModelUnavailable, match="does not exist"):
        resolve_model("some/deep/path", downloader=no_download)  # two slashes: a path, not a Hub id


def test_missing_files_accepts_a_sentencepiece_model(tmp_path):
    folder = write_folder(tmp_path / "m")
    (folder / "tokenizer.json").unlink()
    assert missing_files(folder) == ["tokenizer.json (or tokenizer.model)"]
    (folder / "tokenizer.model").write_bytes(b"spm")
    assert missing_files(folder) == []


def test_local_folder_bad_config_names_file_and_line(tmp_path):
    folder = write_folder(tmp_path / "m", '{\n  "model_type": "llama",\n  oops\n}')
    with pytest.raises(ModelUnavailable, match=r"config\.json:3: invalid JSON"):
        resolve_model(str(folder))
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ModelUnavailable, match=r"config\.json: expected a JSON object, got list"):
        read_config(folder)


def test_nested_rope_theta_is_refused_for_mlx(tmp_path):
    folder = write_folder(tmp_path / "m", {"model_type": "llama", "rope_parameters": {"rope_theta": 1e5}})
    with pytest.raises(
        ModelUnavailable, match=r'config.json: rope_theta 100000.0 is only in rope_parameters.*"rope_theta"'
    ):
        resolve_model(str(folder))
    fix_config_for_mlx(folder / "config.json")
    assert resolve_model(str(folder)).config["rope_theta"] == 1e5
    assert rope_problem({"model_type": "llama", "rope_parameters": {"rope_theta": 10000.0}}) is None
    assert rope_problem({"model_type": "qwen2", "rope_parameters": {"rope_theta": 1e6}}) is None  # llama only


def test_hub_offline_env_never_calls_downloader(tmp_path):
    with pytest.raises(ModelUnavailable) as err:
        resolve_model("org/name", cache_dir=tmp_path, downloader=no_download, env={"HF_HUB_OFFLINE": "1"})
    assert "HF_HUB_OFFLINE=1" in str(err.value) and "FT_TEST_MODEL" in str(err.value)


def test_hub_network_error_names_alternatives(tmp_path):
    def offline(repo_id, cache):
        raise ConnectionError("Name or service not known")

    with pytest.raises(ModelUnavailable) as err:
        resolve_model("HuggingFaceTB/SmolLM2-135M", cache_dir=tmp_path, downloader=offline, env={})
    text = str(err.value)
    assert "Name or service not known" in text and "FT_TEST_MODEL" in text and "local folder" in text


def test_hub_download_resolves_and_is_checked(tmp_path):
    calls = []

    def download(repo_id, cache):
        calls.append((repo_id, cache))
        return write_folder(cache / "snap")

    got = resolve_model("org/name", cache_dir=tmp_path, downloader=download, env={})
    assert got.source == "hub" and calls == [("org/name", tmp_path / "models" / "hub")]
    assert got.path == (tmp_path / "models" / "hub" / "snap").resolve()

    def incomplete(repo_id, cache):
        (cache / "half").mkdir(parents=True)
        return cache / "half"

    with pytest.raises(ModelUnavailable, match="is missing: config.json"):
        resolve_model("org/other", cache_dir=tmp_path, downloader=incomplete, env={})


def test_unknown_spec_is_a_config_error():
    with pytest.raises(ValueError, match="unknown model spec 'no-such-model'"):
        resolve_model("no-such-model", downloader=no_download)


def test_tiny_llama_resolves_as_built(tiny):
    assert tiny.source == "built" and tiny.name == TINY
    assert tiny.config == read_config(tiny.path)
    assert (
        resolve_model(str(tiny.path), downloader=no_download).source == "local"
    )  # the folder itself works too


def test_a_mistyped_relative_folder_is_named_as_a_path_not_a_failed_hub_download(tmp_path, monkeypatch):
    (tmp_path / "models" / "smollm2").mkdir(parents=True)
    monkeypatch.chdir(tmp_path)

    def downloader(repo_id, cache):
        raise AssertionError("a typo in a local path must not reach the Hub")

    with pytest.raises(
        ModelUnavailable,
        match=r"model folder models/smolm2 does not exist \(models/ is a local folder.*did you mean models/smollm2\?",
    ):
        resolve_model("models/smolm2", cache_dir=tmp_path / "c", downloader=downloader, env={})
