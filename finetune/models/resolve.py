"""Resolve a model spec to a local Hugging Face folder that `mlx_lm.load(path)` can load.

Specs:
  a packaged name  smollm2-135m (finetune.models.packaged), gemma3-270m (finetune.models.gemma);
                   tiny-llama, tiny-gpt2 (finetune.models.tiny)
  a local path     a folder with config.json, *.safetensors and a tokenizer
  org/name, gpt2   a Hugging Face Hub id (snapshot_download); offline it raises ModelUnavailable saying what to do
"""

from __future__ import annotations

import difflib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path

from finetune.models.cache import MARKER, Log, ModelUnavailable, cache_root, stderr_log
from finetune.models.gemma import GEMMA3, build_gemma3
from finetune.models.packaged import SMOLLM2, build_smollm2, converted_smollm2, smollm2_gguf
from finetune.models.safetensors import SafetensorsError, read_header
from finetune.models.tiny import TINY, TINY_GPT2, build_tiny_gpt2, build_tiny_llama


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    path: Path
    source: str  # "package" | "local" | "hub" | "built"
    config: dict
    license: str | None = None  # terms a packaged model ships with (recorded in its cache marker)


Downloader = Callable[[str, Path], Path]
PACKAGED = (SMOLLM2, GEMMA3, TINY, TINY_GPT2)
# Hub ids without an organisation that users (and the seed's tiers) name; they need the Hub like any other.
HUB_NAMES = ("gpt2", "distilgpt2", "gpt2-medium", "gpt2-large")


def resolve_model(
    spec: str,
    *,
    cache_dir: Path | None = None,
    downloader: Downloader | None = None,
    env: Mapping[str, str] | None = None,
    log: Log = stderr_log,
) -> ResolvedModel:
    """Turn a spec (see module docstring) into a loadable folder. Raises ModelUnavailable with a reason."""
    env = os.environ if env is None else env
    root = cache_root(cache_dir, env) / "models"
    if spec == SMOLLM2:
        return _resolved(spec, build_smollm2(root, log=log), "package")
    if spec == GEMMA3:
        return _resolved(spec, build_gemma3(root, log=log), "package")
    if spec == TINY:
        gguf, donor = smollm2_gguf(), lambda sha: converted_smollm2(root, sha)
        return _resolved(spec, build_tiny_llama(root, gguf=gguf, donor=donor, log=log), "built")
    if spec == TINY_GPT2:
        return _resolved(spec, build_tiny_gpt2(root, log=log), "built")
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") >= 2:
        return _resolved(spec, _check_local(path), "local")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) and path.parent.is_dir():
        raise ModelUnavailable(_mistyped(path))  # "models/smolm2" with ./models here: a typo, not a Hub id
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec) or spec in HUB_NAMES:
        return _resolved(spec, _from_hub(spec, root, downloader or hub_download, env), "hub")
    raise ModelUnavailable(
        f"unknown model spec {spec!r}: use {', '.join(repr(s) for s in PACKAGED)}, a local folder path, or a Hub "
        "id 'org/name'"
    )


def _resolved(name: str, path: Path, source: str) -> ResolvedModel:
    marker = Path(path) / MARKER
    terms = json.loads(marker.read_text()).get("license") if marker.is_file() else None
    return ResolvedModel(name=name, path=path, source=source, config=read_config(path), license=terms)


def read_config(folder: Path) -> dict:
    """config.json as a dict; a clear error naming the file and line if it is not valid JSON."""
    file = Path(folder) / "config.json"
    try:
        config = json.loads(file.read_text())
    except json.JSONDecodeError as exc:
        raise ModelUnavailable(f"{file}:{exc.lineno}: invalid JSON: {exc.msg}") from exc
    if not isinstance(config, dict):
        raise ModelUnavailable(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config


def missing_files(folder: Path) -> list[str]:
    """What a folder lacks for mlx_lm.load + chat templating; empty when complete."""
    folder = Path(folder)
    missing = []
    if not (folder / "config.json").is_file():
        missing.append("config.json")
    if not any(folder.glob("*.safetensors")):
        missing.append("*.safetensors (weights)")
    if not ((folder / "tokenizer.json").is_file() or (folder / "tokenizer.model").is_file()):
        missing.append("tokenizer.json (or tokenizer.model)")
    if not (folder / "tokenizer_config.json").is_file():
        missing.append("tokenizer_config.json")
    return missing


def _check_local(path: Path) -> Path:
    if not path.is_dir():
        raise ModelUnavailable(f"model folder {path} does not exist (or is not a directory)")
    missing = missing_files(path)
    if missing:
        raise ModelUnavailable(f"model folder {path} is missing: {', '.join(missing)}")
    problem = rope_problem(read_config(path))
    if problem:
        raise ModelUnavailable(f"{path / 'config.json'}: {problem}")
    for file in sorted(
        path.glob("*.safetensors")
    ):  # a truncated download is bad input, not a crash in training
        try:
            read_header(file)
        except SafetensorsError as exc:
            raise ModelUnavailable(f"model folder {path}: {exc}; download or copy it again") from None
    return path.resolve()


def rope_problem(config: Mapping) -> str | None:
    """mlx_lm's llama reads only a top-level rope_theta (default 1e4); transformers 5 may nest it.

    Measured: SmolLM2 (theta 1e5) read with 1e4 still said "Paris" to a bare prompt but answered chat in
    garbled French, so this is refused rather than left to fail quietly.
    """
    nested = (config.get("rope_parameters") or {}).get("rope_theta")
    if (
        config.get("model_type") == "llama"
        and "rope_theta" not in config
        and nested not in (None, 10000, 1e4)
    ):
        return f'rope_theta {nested} is only in rope_parameters; mlx_lm would use 10000. Add "rope_theta": {nested}'
    return None


def _mistyped(path: Path) -> str:
    folders = [p.name for p in path.parent.iterdir() if p.is_dir()]
    near = difflib.get_close_matches(path.name, folders, n=3, cutoff=0.5)
    guess = f": did you mean {' or '.join(str(path.parent / n) for n in near)}?" if near else ""
    return (
        f"model folder {path} does not exist ({path.parent}/ is a local folder, so this is read as a path, "
        f"not a Hub id){guess}"
    )


def hub_download(repo_id: str, cache: Path) -> Path:
    """Default downloader: huggingface_hub.snapshot_download of weights, config and tokenizer files."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
    return Path(snapshot_download(repo_id, cache_dir=str(cache), allow_patterns=patterns))


def _from_hub(repo_id: str, root: Path, downloader: Downloader, env: Mapping[str, str]) -> Path:
    alternatives = (
        f"This machine cannot reach the Hub: use a packaged model ({', '.join(PACKAGED)}) in FT_TEST_MODEL / "
        "model.name, or copy the model's folder to this machine and pass that local folder's path."
    )
    if env.get("HF_HUB_OFFLINE") == "1":
        raise ModelUnavailable(f"cannot download {repo_id!r}: HF_HUB_OFFLINE=1. {alternatives}")
    try:
        path = Path(downloader(repo_id, root / "hub"))
    except Exception as exc:  # network, auth, 404: all mean "not available here"
        raise ModelUnavailable(
            f"cannot download {repo_id!r} from the Hugging Face Hub ({type(exc).__name__}: {exc}). {alternatives}"
        ) from exc
    return _check_local(path)
