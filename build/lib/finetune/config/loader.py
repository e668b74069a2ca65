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
KNOWN_ALIASES = {
    "lora_layers": "num_layers",
    "lora_rank": "rank",
    "r": "rank",
    "lora_alpha": "alpha",
    "lora_dropout": "dropout",
    "target_modules": "keys",
    "lr": "learning_rate",
    "epochs": "iters",
    "steps": "iters",
    "gradient_checkpointing": "grad_checkpoint",
    "gradient_accumulation_steps": "grad_accumulation_steps",
    "steps_per_eval": "eval_every",
    "steps_per_save": "save_every",
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


def _suggest(key: str, valid: list[str]) -> str:
    if key in KNOWN_ALIASES and KNOWN_ALIASES[key] in valid:
        return f"; did you mean {KNOWN_ALIASES[key]}?"
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
                f"{_locate(docs, path)}: {'.'.join(map(str, path))}: unknown key{_suggest(str(key), valid)}"
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
