"""Loading a run configuration: YAML profiles with line numbers, and a single precedence rule.

base.yaml <- profile (may `extends` another profile) <- user YAML <- `--set key=value`.
Every error names the file, the line and the key; unknown keys get the nearest valid name.
"""

from __future__ import annotations

import difflib
import os
import re
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel, ValidationError

from finetune.config.schema import LoraConfig, RunConfig
from finetune.errors import UserError
from finetune.system.atomic import atomic_write_text

# The profiles ship inside the package (so a wheel has them); the repo's top-level configs/ links here.
CONFIG_DIR = Path(os.environ.get("FT_CONFIG_DIR", Path(__file__).resolve().parent / "profiles"))

# Names users bring from other tools: a direct hint beats fuzzy matching.
# Names other tools use (Hugging Face Trainer, PEFT, axolotl, mlx-lm) -> ours, with what differs. A misspelling
# is matched by spelling; these by meaning (data.path is data.source, not the nearest spelling, template).
KNOWN_ALIASES = {
    "lora_layers": ("lora.num_layers", ""),
    "lora_rank": ("lora.rank", ""),
    "r": ("lora.rank", ""),
    "lora_r": ("lora.rank", ""),
    "lora_alpha": ("lora.alpha", ""),
    "lora_dropout": ("lora.dropout", ""),
    "target_modules": ("lora.keys", ""),
    "lora_target_modules": ("lora.keys", ""),
    "lora_parameters": ("lora", "rank, scale, dropout and keys are keys of the lora section"),
    "lr": ("training.learning_rate", ""),
    "epochs": ("training.iters", "optimizer steps, not epochs: iters = epochs x train rows / batch_size"),
    "num_epochs": ("training.iters", "optimizer steps, not epochs: iters = epochs x train rows / batch_size"),
    "num_train_epochs": (
        "training.iters",
        "optimizer steps, not epochs: iters = epochs x train rows / batch_size",
    ),
    "steps": ("training.iters", ""),
    "max_steps": ("training.iters", ""),
    "per_device_train_batch_size": ("training.batch_size", ""),
    "micro_batch_size": ("training.batch_size", ""),
    "gradient_checkpointing": ("training.grad_checkpoint", ""),
    "gradient_accumulation_steps": ("training.grad_accumulation_steps", ""),
    "warmup_ratio": ("training.warmup_steps", "a number of steps, not a share"),
    "steps_per_eval": ("training.eval_every", ""),
    "eval_steps": ("training.eval_every", ""),
    "steps_per_save": ("training.save_every", ""),
    "save_steps": ("training.save_every", ""),
    "path": ("data.source", "a file, a saved dataset folder or a Hub id"),
    "data_path": ("data.source", "a file, a saved dataset folder or a Hub id"),
    "dataset": ("data.source", "a file, a saved dataset folder or a Hub id"),
    "datasets": ("data.source", "one file, saved dataset folder or Hub id"),
    "train_file": ("data.source", "one file; the valid and test splits are cut from it by data.splits"),
    "dataset_path": ("data.source", ""),
    "max_seq_len": ("data.max_seq_length", ""),
    "max_length": ("data.max_seq_length", ""),
    "sequence_len": ("data.max_seq_length", ""),
    "cutoff_len": ("data.max_seq_length", ""),
    "chat_template": (
        "data.template",
        "a name: tokenizer, auto, chatml, gemma, llama3, llama2, alpaca, plain",
    ),
    "prompt_template": ("data.template", ""),
    "train_on_inputs": ("data.mask_prompt", "the opposite sense: train_on_inputs true is mask_prompt false"),
    "val_set_size": ("data.splits", "three shares (train, valid, test) summing to 1"),
    "model_name_or_path": ("model.name", ""),
    "base_model": ("model.name", ""),
    "model_id": ("model.name", ""),
    "model_path": ("model.name", "a packaged name, a local folder or a Hub id"),
}


class ConfigError(UserError):
    """A configuration problem, worded for the user (file:line: key: what is wrong)."""


# ---------------------------------------------------------------- YAML with line numbers


class _Loader(yaml.SafeLoader):
    """SafeLoader that reads 1e-5 as a float (YAML 1.1 wants a dot) and keeps key line numbers."""


_FLOAT = re.compile(
    r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?(?:[eE][-+]?[0-9]+)$|^[-+]?\.?[0-9][0-9_]*\.[0-9_]*$"
)
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def _key_lines(node: yaml.Node, prefix: tuple = (), out: dict | None = None) -> dict[tuple, int]:
    out = {} if out is None else out
    if isinstance(node, yaml.MappingNode):
        for key, value in node.value:
            path = (*prefix, key.value)
            out[path] = key.start_mark.line + 1
            _key_lines(value, path, out)
    return out


class _Doc:
    """A parsed YAML document: its data, where it came from, and the line of every key."""

    def __init__(self, data: dict, source: str, lines: dict[tuple, int]):
        self.data, self.source, self.lines = data, source, lines

    def where(self, path: tuple) -> str:
        for n in range(len(path), 0, -1):
            if self.lines.get(path[:n]):
                return f"{self.source}:{self.lines[path[:n]]}"
        return self.source


def _parse_yaml(text: str, source: str) -> _Doc:
    try:
        node = yaml.compose(text, Loader=_Loader)
        data = yaml.load(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError(f"{where}: invalid YAML: {problem}") from None
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: a config must be a mapping of sections, got {type(data).__name__}")
    return _Doc(data, source, _key_lines(node) if node is not None else {})


def _read_yaml(path: Path) -> _Doc:
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    return _parse_yaml(path.read_text(encoding="utf-8"), str(path))


# ---------------------------------------------------------------- merging and validation


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for key, value in over.items():
        if isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = _merge(out[key], value)
        else:
            out[key] = value
    return out


def _drop_shadowed_scale(data: dict, doc: _Doc) -> dict:
    """scale and alpha are one setting: a later layer giving one replaces an inherited other."""
    lora = doc.data.get("lora")
    if not isinstance(lora, dict) or not isinstance(data.get("lora"), dict):
        return data
    if lora.get("alpha") is not None and lora.get("scale") is not None:
        raise ConfigError(
            f"{doc.where(('lora', 'alpha'))}: lora: give either scale (mlx-lm, a raw multiplier) "
            "or alpha (PEFT, scale = alpha / rank), not both"
        )
    drop = "scale" if lora.get("alpha") is not None else "alpha" if lora.get("scale") is not None else None
    if drop is None:
        return data
    return {**data, "lora": {k: v for k, v in data["lora"].items() if k != drop}}


def _section_model(path: tuple) -> type[BaseModel] | None:
    model: type[BaseModel] = RunConfig
    for key in path:
        field = model.model_fields.get(key)
        ann = getattr(field, "annotation", None)
        if not (isinstance(ann, type) and issubclass(ann, BaseModel)):
            return None
        model = ann
    return model


def _suggest(key: str, valid: list[str], prefix: tuple = ()) -> str:
    if key in KNOWN_ALIASES:
        target, note = KNOWN_ALIASES[key]
        section, _, name = target.rpartition(".")
        short = name if section == ".".join(map(str, prefix)) and name in valid else target
        return f"; did you mean {short}?" + (f" ({note})" if note else "")
    close = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    return f"; did you mean {close[0]}?" if close else f"; valid keys: {', '.join(valid)}"


def _check_keys(data: dict, docs: list[_Doc], prefix: tuple = ()) -> None:
    """Refuse unknown keys before pydantic does, so the message can name the nearest valid key."""
    model = _section_model(prefix)
    if model is None:
        return
    valid = list(model.model_fields)
    if model is LoraConfig:
        valid.append("alpha")
    if model is RunConfig:
        valid.append("extends")
    for key, value in data.items():
        path = (*prefix, key)
        if key not in valid:
            raise ConfigError(
                f"{_locate(docs, path)}: {'.'.join(map(str, path))}: unknown key{_suggest(str(key), valid, prefix)}"
            )
        if isinstance(value, dict):
            _check_keys(value, docs, path)


def _locate(docs: list[_Doc], path: tuple) -> str:
    """The last document (highest precedence) that sets this key wins, so it is the one to blame."""
    for doc in reversed(docs):
        if path[:1] in doc.lines or any(p[: len(path)] == path for p in doc.lines):
            return doc.where(path)
    return docs[-1].source if docs else "<config>"


def _validate(data: dict, docs: list[_Doc]) -> RunConfig:
    _check_keys(data, docs)
    try:
        return RunConfig.model_validate({k: v for k, v in data.items() if k != "extends"})
    except ValidationError as exc:
        err = exc.errors()[0]
        path = tuple(str(p) for p in err["loc"])
        key = ".".join(path) or "<root>"
        got = f" (got {err['input']!r})" if "input" in err and not isinstance(err["input"], dict) else ""
        msg = err["msg"].removeprefix("Value error, ")
        more = f" (+{exc.error_count() - 1} more)" if exc.error_count() > 1 else ""
        raise ConfigError(f"{_locate(docs, tuple(err['loc']))}: {key}: {msg}{got}{more}") from None


# ---------------------------------------------------------------- public API


def list_profiles(config_dir: Path = CONFIG_DIR) -> list[str]:
    return sorted(p.stem for p in config_dir.glob("*.yaml") if p.stem != "base")


def _profile_docs(name: str, config_dir: Path, seen: tuple = ()) -> list[_Doc]:
    path = config_dir / f"{name}.yaml"
    if not path.is_file():
        raise ConfigError(f"unknown profile {name!r}; available: {', '.join(list_profiles(config_dir))}")
    if name in seen:
        raise ConfigError(f"{path}: profile inheritance loops: {' -> '.join((*seen, name))}")
    doc = _read_yaml(path)
    parent = doc.data.get("extends", "base" if name != "base" else None)
    parents = _profile_docs(parent, config_dir, (*seen, name)) if parent else []
    return [*parents, doc]


def parse_set(assignment: str) -> tuple[list[str], Any]:
    """`training.learning_rate=2e-4` -> (["training", "learning_rate"], 0.0002)."""
    if "=" not in assignment:
        raise ConfigError(f"--set {assignment!r}: expected key=value, e.g. training.iters=50")
    key, raw = assignment.split("=", 1)
    if not key.strip():
        raise ConfigError(f"--set {assignment!r}: empty key")
    try:
        value = yaml.load(raw, Loader=_Loader) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw  # not YAML (e.g. a Go template like {{ .Prompt }}): take the text as it is
    return key.strip().split("."), value


def load_config(
    profile: str | None = None,
    user_file: str | Path | None = None,
    overrides: list[str] = (),
    config_dir: Path = CONFIG_DIR,
) -> RunConfig:
    """Resolve base <- profile <- user YAML <- --set overrides into one validated RunConfig."""
    docs = _profile_docs(profile or "base", config_dir)
    if user_file is not None:
        user = _read_yaml(Path(user_file))
        _paths_from(user.data, Path(user_file).parent)
        parent = user.data.get("extends")  # a user file may name its profile itself
        if parent and profile is None:
            docs, profile = _profile_docs(parent, config_dir), parent
        elif parent and parent != profile:
            raise ConfigError(
                f"{user.where(('extends',))}: extends {parent!r}, but --profile {profile!r} was given"
            )
        docs.append(user)
    for assignment in overrides:
        keys, value = parse_set(assignment)
        nested: Any = value
        for key in reversed(keys):
            nested = {key: nested}
        docs.append(
            _Doc(nested, f"--set {assignment}", {tuple(keys[:i]): 0 for i in range(1, len(keys) + 1)})
        )
    data: dict = {}
    for doc in docs:
        data = _merge(_drop_shadowed_scale(data, doc), doc.data)
    data.pop("extends", None)
    data["profile"] = profile or data.get("profile")
    return _validate(data, docs)


PATH_KEYS = (("data", "source"), ("model", "name"), ("output_dir",))


def _paths_from(data: dict, folder: Path) -> None:
    """A relative path in a user's YAML means relative to that YAML, as a reader of the file expects: it is
    made absolute when it exists there or is written ./ or ../ (Hub ids, builtin: and packaged names stay)."""
    for keys in PATH_KEYS:
        node = data
        for key in keys[:-1]:
            node = node.get(key) if isinstance(node.get(key), dict) else {}
        value = node.get(keys[-1])
        if not isinstance(value, str) or ":" in value or Path(value).expanduser().is_absolute():
            continue
        if value.startswith(("./", "../")) or (keys != ("output_dir",) and (folder / value).exists()):
            node[keys[-1]] = str((folder / value).resolve())


def load_file(path: str | Path) -> RunConfig:
    """Validate one file on its own (defaults fill what it leaves out)."""
    doc = _read_yaml(Path(path))
    if "extends" in doc.data:
        return load_config(user_file=path)
    return _validate(doc.data, [doc])


def save_config(cfg: RunConfig, path: str | Path) -> Path:
    """Atomic write, so a crash never leaves half a config behind."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    text = yaml.safe_dump(cfg.to_dict(), sort_keys=False, default_flow_style=False)
    atomic_write_text(path, text)
    return path
