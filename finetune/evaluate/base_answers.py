"""The base model's greedy answers, kept by content: the base never changes between runs, so a rerun, a replay or
another fine-tune of the same base does not decode them again. The key holds the sha256 of the base's files, the
prompts, the token budget, FineTune's own source and the MLX versions, never sizes or paths."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path

from finetune.gates.parity import Answer
from finetune.system.atomic import atomic_write_json
from finetune.system.hashing import dir_sha256, json_sha256, mlx_measurement_versions

VERSION = 1
FOLDER = Path("base-answers") / "evaluate"  # under the cache root (finetune.models.cache)


def key_path(folder: Path, base_dir: Path, prompts: Sequence[str], budget: int) -> Path:
    key = {
        "base": dir_sha256(base_dir)[0],
        "prompts": list(prompts),
        "budget": budget,
        **mlx_measurement_versions(),
        "v": VERSION,
    }
    return Path(folder) / f"{json_sha256(key)[:32]}.json"


def base_answers(
    folder: Path | None,
    base_dir: Path,
    prompts: Sequence[str],
    budget: int,
    generate: Callable[[], list[Answer]],
    log: Callable[[str], None] = lambda _: None,
) -> list[Answer]:
    """generate()'s answers, or the ones it gave before for the same content (folder None: always generated)."""
    if folder is None:
        return generate()
    path = key_path(folder, base_dir, prompts, budget)
    try:
        kept = [Answer(**a) for a in json.loads(path.read_text())["answers"]]
    except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: decode again
        kept = None
    if kept is not None and len(kept) == len(prompts):
        log(f"[evaluate] mlx_base: the same base's answers to these prompts, kept from before ({path.name})")
        return kept
    answers = list(generate())
    atomic_write_json(path, {"answers": [a.to_dict() for a in answers]})
    return answers
