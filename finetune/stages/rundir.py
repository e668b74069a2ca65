"""A run directory owns its config: RUN/config.yaml is written once, and every later command on RUN uses it.

A command given a profile, --config or --set for an existing run must resolve to exactly RUN/config.yaml,
or it is refused with the differing keys named. A few keys may change on purpose with --override (how long
to train, how often to evaluate or save, the gates' thresholds); each override is recorded in
RUN/overrides.jsonl, and resuming with it continues the same run.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from finetune.config.loader import ConfigError, load_file, parse_set, save_config
from finetune.config.schema import RunConfig
from finetune.system.owned import MARKER, claim, is_owned

CONFIG_NAME = "config.yaml"
OVERRIDES = "overrides.jsonl"
# Keys that do not change what a resumed run has trained so far (a constant schedule's length, cadences,
# thresholds): the same run may continue with new values.
OVERRIDABLE = (
    "training.iters",
    "training.eval_every",
    "training.save_every",
    "training.early_stopping_patience",
    "training.val_batches",
    "training.ranks",  # data parallel: the same global batches, on another number of ranks
    "training.rank_timeout_s",
    "gates.",
    "deploy.model_name",
)


def new_run_dir(cfg: RunConfig, base: Path | None = None) -> Path:
    """A fresh, empty folder <output_dir>/<profile>-<time>[-N]: two runs started in one second never share one."""
    stamp = datetime.now(UTC).strftime("%Y%m%d-%H%M%S")
    parent = Path(base or cfg.output_dir)
    parent.mkdir(parents=True, exist_ok=True)
    for n in range(1, 1000):
        path = parent / f"{cfg.profile or 'run'}-{stamp}{'' if n == 1 else f'-{n}'}"
        try:
            path.mkdir()  # atomic: exactly one process creates it
            return path
        except FileExistsError:
            continue
    raise RuntimeError(f"no free run folder name under {parent} for {stamp}")


def _flatten(data: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(data, dict):
        out: dict[str, Any] = {}
        for k, v in data.items():
            out.update(_flatten(v, f"{prefix}{k}."))
        return out
    return {prefix[:-1]: data}


def differences(owned: RunConfig, requested: RunConfig) -> list[str]:
    a, b = _flatten(owned.to_dict()), _flatten(requested.to_dict())
    return [
        f"{k}: run has {a.get(k)!r}, given {b.get(k)!r}"
        for k in sorted(set(a) | set(b))
        if a.get(k) != b.get(k)
    ]


def _overridable(key: str) -> bool:
    return any(key == k or (k.endswith(".") and key.startswith(k)) for k in OVERRIDABLE)


def apply_overrides(
    cfg: RunConfig, overrides: Sequence[str], config_file: Path
) -> tuple[RunConfig, list[dict]]:
    data, changes = cfg.to_dict(), []
    for assignment in overrides:
        keys, value = parse_set(assignment)
        key = ".".join(keys)
        if not _overridable(key):
            raise ConfigError(
                f"--override {assignment}: {key} changes what this run trains; only these may change on an "
                f"existing run: {', '.join(OVERRIDABLE)}. Start a new --run-dir instead"
            )
        if key == "training.iters" and cfg.training.lr_schedule != "constant":
            raise ConfigError(
                f"--override {assignment}: the {cfg.training.lr_schedule} schedule depends on "
                "training.iters, so a resumed run would not equal one trained that long"
            )
        node = data
        for k in keys[:-1]:
            if not isinstance(node.get(k), dict):
                raise ConfigError(f"--override {assignment}: {config_file} has no section {k!r}")
            node = node[k]
        old = node.get(keys[-1])
        node[keys[-1]] = value
        changes.append({"key": key, "old": old, "new": value})
    try:
        new = RunConfig.model_validate(data)
    except Exception as exc:
        raise ConfigError(f"--override {' '.join(overrides)}: {exc}") from None
    return new, changes


def own_config(
    run_dir: Path, requested: RunConfig | None, overrides: Sequence[str] = (), *, command: str = "run"
) -> RunConfig:
    """The run's config: RUN/config.yaml if it exists (checked against `requested`), else `requested`, saved."""
    path = Path(run_dir) / CONFIG_NAME
    if requested is None and not (path.is_file() and is_owned(run_dir)):
        why = (
            f"its {CONFIG_NAME} was not written by FineTune (no {MARKER})"
            if path.is_file()
            else f"no {CONFIG_NAME}"
        )
        raise ConfigError(f"{run_dir}: {why}: not a FineTune run directory (give a profile to start one)")
    if overrides and not path.is_file():
        raise ConfigError(f"--override: {run_dir} is a new run; set values with --set")
    claim(run_dir)  # a non-empty folder FineTune did not create is refused before a byte is written
    if not path.is_file():
        save_config(requested, path)
        return requested
    owned = load_file(path)
    if requested is not None and (diff := differences(owned, requested)):
        raise ConfigError(
            f"{path} already holds this run's config and the options given differ: {'; '.join(diff[:12])}"
            f"{' ...' if len(diff) > 12 else ''}. Rerun as `finetune {command} --run-dir {run_dir} --resume` "
            "(it uses the run's own config), change an allowed key with --override KEY=VALUE, or use another --run-dir"
        )
    if not overrides:
        return owned
    cfg, changes = apply_overrides(owned, overrides, path)
    stamp = datetime.now(UTC).isoformat(timespec="seconds")
    with open(Path(run_dir) / OVERRIDES, "a", encoding="utf-8") as fh:
        for change in changes:
            fh.write(json.dumps({"at": stamp, **change}) + "\n")
    save_config(cfg, path)
    return cfg


def resume_command(command: str, run_dir: Path) -> str:
    return f"finetune {command} --run-dir {run_dir} --resume"
