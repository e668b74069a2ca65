"""What a stage's key holds besides its config sections and upstream stages (Stage.inputs).

The runner adds these to every stage's inputs: the content digests of the user's files it reads (a data
file or saved dataset folder, a local model folder; a built-in set or packaged model has none: its bytes are
the model stage's artifact) and the versions of the tools that make its output. Upstream stages' digests
and artifact digests are in each key already, so a change reruns that stage and everything after it.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import finetune
from finetune.system.hashing import dir_sha256, file_sha256, source_sha256

Ctx = Any  # finetune.stages.context.Ctx (not imported: the runner imports this module, floors stay few)
MLX = ("mlx", "mlx-lm")
CONVERTER = "llama.cpp-converter"  # the convert_hf_to_gguf.py bundle (with its own gguf-py)
OLLAMA = "ollama"  # a binary: known by the version it reports, never by where it lies
TOOLS: dict[str, tuple[str, ...]] = {
    "data": ("transformers", "tokenizers"),  # the tokenizer measures and cuts rows
    "train": (*MLX, "transformers", "tokenizers"),
    "judge": (*MLX, "transformers"),  # it reloads base + adapter and answers
    "fuse": MLX,
    "gguf": (CONVERTER, "gguf", "transformers", "torch"),  # the converter, then the PyPI gguf reader checks
    "ollama": (OLLAMA,),
    "evaluate": (*MLX, "transformers", "xllamacpp", OLLAMA),
}


def code_version() -> str:
    """This finetune's version and the digest of its source: every stage key holds it."""
    return f"{finetune.__version__}+{source_sha256()[:16]}"


def key_parts(ctx: Ctx, stage: str) -> dict[str, Any]:
    return {"tools": tools(ctx, stage), "content": content(ctx, stage)}


def tools(ctx: Ctx, stage: str) -> dict[str, str | None]:
    return {
        name: _ollama_version(ctx) if name == OLLAMA else ctx.deps.tool_version(name)
        for name in TOOLS.get(stage, ())
    }


def _ollama_version(ctx: Ctx) -> str | None:
    binary = ctx.deps.locate_ollama().binary
    return None if binary is None else ctx.deps.ollama_version(Path(binary))


def content(ctx: Ctx, stage: str) -> dict[str, dict[str, str]]:
    """{config key: {path, sha256}} of the user's local files this stage reads."""
    if stage == "data":
        return _local("data.source", ctx.cfg.data.source)
    if stage == "model" and Path(ctx.cfg.model.name).expanduser().is_dir():  # not a packaged name or Hub id
        return _local("model.name", ctx.cfg.model.name)
    return {}


def _local(key: str, spec: str) -> dict[str, dict[str, str]]:
    path = Path(spec).expanduser()
    if spec.startswith(("builtin:", "hf:")) or not path.exists():  # generated, on the Hub, or missing
        return {}
    sha = file_sha256(path) if path.is_file() else dir_sha256(path)[0]
    return {key: {"path": str(path.absolute()), "sha256": sha}}


def input_changes(old: dict[str, Any], new: dict[str, Any]) -> list[str]:
    """What differs between a stage's recorded inputs and today's, in words: files and tools by name."""
    said, rest = [], sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
    for part, words in (("content", _file_change), ("tools", _tool_change)):
        if part in rest:
            rest.remove(part)
            was, now = old.get(part) or {}, new.get(part) or {}
            said += [
                words(k, was.get(k), now.get(k))
                for k in sorted(was.keys() | now.keys())
                if was.get(k) != now.get(k)
            ]
    if rest or not said:
        said.append(f"inputs changed: {', '.join(rest) or 'recorded in another form'}")
    return said


def _file_change(key: str, was: dict | None, now: dict | None) -> str:
    if now is None or was is None:
        return (
            f"{key}: {was['path'] if was else 'not'} a local file then, {now['path'] if now else 'not'} now"
        )
    return f"{now['path']} ({key}) changed since it was recorded (sha256 {was['sha256'][:12]}… → {now['sha256'][:12]}…)"


def _tool_change(name: str, was: str | None, now: str | None) -> str:
    return f"{name} {was or 'absent'} → {now or 'absent'}"
