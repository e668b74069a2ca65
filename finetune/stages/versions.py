"""Versions of the tools that make stage outputs (the real Deps' `tool_version` and `ollama_version`;
stage keys hold them, finetune.stages.keys).

Python packages by their installed distribution version; llama.cpp's converter by its pinned bundle and the
digest of the fetched files; Ollama by what its binary reports, never by where it lies.
"""

from __future__ import annotations

import functools
from pathlib import Path

from finetune.stages.keys import CONVERTER
from finetune.system.hashing import dir_manifest, manifest_sha256
from finetune.system.packages import package_version

_OLLAMA_MEMO: dict[tuple, str] = {}


def tool_version(name: str) -> str | None:
    """An installed package's version (None when absent), or CONVERTER's bundle identity."""
    return converter_version() if name == CONVERTER else _package_version(name)


_package_version = functools.cache(package_version)  # installed packages do not change under a process


def converter_version() -> str:
    """Pinned version and sdist sha256, plus the digest of the fetched files (an edited copy is another tool)."""
    from finetune.export import converter

    tree = converter.default_dest() / f"{converter.PACKAGE}-{converter.VERSION}-llama.cpp"
    files = {
        rel: sha
        for rel, sha in (dir_manifest(tree) if tree.is_dir() else {}).items()
        if "__pycache__" not in rel and rel != converter.MARKER
    }
    fetched = manifest_sha256(files)[:16] if files else "not fetched"
    return f"{converter.VERSION} (sdist {converter.SDIST_SHA256[:16]}, files {fetched})"


def ollama_version(binary: Path) -> str:
    """What `ollama -v` reports, memoised per process by the binary's stat; a binary that cannot say is
    named by the error, so the key still changes when it is replaced by one that can."""
    from finetune.serve.ollama_provision import read_version

    try:
        st = Path(binary).stat()
    except OSError as exc:
        return f"unreadable ({type(exc).__name__})"
    key = (str(binary), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino)
    if key not in _OLLAMA_MEMO:
        try:
            _OLLAMA_MEMO[key] = read_version(Path(binary))
        except Exception as exc:  # not executable, a timeout: the stage itself will say what is wrong
            return f"unreadable ({type(exc).__name__})"
    return _OLLAMA_MEMO[key]
