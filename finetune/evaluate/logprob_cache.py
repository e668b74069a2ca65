"""Logprob measurements kept by the content of what they measured: a replayed evaluation (another Modelfile,
a rerun) does not score a 1024-token context again for the same GGUF, adapter and base. The key holds the
sha256 of each file, the token ids, the settings and FineTune's own source, never sizes or paths."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from finetune.gates.parity import ReferenceRows
from finetune.system.atomic import atomic_write_json
from finetune.system.hashing import dir_sha256, file_sha256, json_sha256, source_sha256

VERSION = 2  # 2: the short answers and the long context kept apart


def files_key(inputs: Any) -> dict[str, str] | None:
    """What every part's key shares (hashed once per evaluation): the files scored; None: nothing is kept."""
    if inputs.cache_dir is None:
        return None
    return {
        "gguf": file_sha256(inputs.gguf),
        "adapter": dir_sha256(inputs.adapter_dir)[0],
        "base": dir_sha256(inputs.base_dir)[0],
    }


class Cache:
    def __init__(
        self, folder: Path | None, files: dict | None, inputs: Any, ids: list[int], prompt: list[int]
    ):
        self.path = None
        if folder is not None and files is not None:
            s = inputs.settings
            key = {
                **files,
                "ids": ids,
                "prompt": prompt,
                "settings": [s.top_k, s.ref_top_k, s.long_positions],
                "code": source_sha256(),
                "v": VERSION,
            }
            self.path = Path(folder) / f"{json_sha256(key)[:32]}.json"

    def load(self) -> tuple[ReferenceRows, list[dict[int, float]], dict[str, int]] | None:
        if self.path is None:
            return None
        try:
            return _read(self.path)
        except (OSError, ValueError, KeyError, TypeError):  # none yet, or unreadable: measure again
            return None

    def save(self, reference: ReferenceRows, candidate: list[dict[int, float]], long: dict[str, int]) -> None:
        if self.path is not None:
            atomic_write_json(self.path, {"top": _pairs(reference.top), "at": _pairs(reference.at),
                                          "candidate": _pairs(candidate), "long": long})  # fmt: skip


def _pairs(rows: list[dict[int, float]]) -> list[list]:
    return [list(r.items()) for r in rows]  # [id, value] pairs: JSON object keys would become strings


def _rows(pairs: list[list]) -> list[dict[int, float]]:
    return [{int(t): float(v) for t, v in row} for row in pairs]


def _read(path: Path) -> tuple[ReferenceRows, list[dict[int, float]], dict[str, int]]:
    data = json.loads(path.read_text())
    return ReferenceRows(_rows(data["top"]), _rows(data["at"])), _rows(data["candidate"]), dict(data["long"])
