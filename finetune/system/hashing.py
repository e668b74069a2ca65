"""sha256 of files, folders, JSON-able values and of FineTune's own source (the code version in stage digests)."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

_SHA_MEMO: dict[tuple, str] = {}
PACKAGE_ROOT = Path(__file__).resolve().parents[1]


def file_sha256(path: str | Path) -> str:
    """sha256 of a file's bytes (the 98 MB GGUF takes ~0.3 s), memoised per process by its stat.

    The memo key has the inode and ctime too: a copy that keeps size and mtime (cp -p, shutil.copy2) still
    changes ctime, so a file rewritten under the run is hashed again.
    """
    path = Path(path)
    st = path.stat()
    key = (str(path), st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev)
    if key not in _SHA_MEMO:
        digest = hashlib.sha256()
        with open(path, "rb") as fh:
            for chunk in iter(lambda: fh.read(1 << 20), b""):
                digest.update(chunk)
        _SHA_MEMO[key] = digest.hexdigest()
    return _SHA_MEMO[key]


def dir_manifest(path: str | Path) -> dict[str, str]:
    """{relative path: sha256} of every file under a folder, sorted by path."""
    path = Path(path)
    return {
        f.relative_to(path).as_posix(): file_sha256(f)
        for f in sorted(p for p in path.rglob("*") if p.is_file())
    }


def manifest_sha256(manifest: dict[str, str]) -> str:
    """A folder's digest from its manifest: sha256 over the sorted relative paths and file digests."""
    digest = hashlib.sha256()
    for rel in sorted(manifest):
        digest.update(f"{rel}\0{manifest[rel]}\n".encode())
    return digest.hexdigest()


def dir_sha256(path: str | Path) -> tuple[str, int]:
    """(sha256 over the sorted relative paths and digests of a folder's files, total bytes)."""
    path = Path(path)
    manifest = dir_manifest(path)
    return manifest_sha256(manifest), sum((path / rel).stat().st_size for rel in manifest)


def json_sha256(value: Any) -> str:
    return hashlib.sha256(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()


def mlx_measurement_versions() -> dict[str, Any]:
    """What an MLX measurement depends on besides its inputs: FineTune's own source and the MLX it ran on (a
    decoder fix or an MLX upgrade must not replay an old measurement)."""
    from importlib.metadata import version

    return {"code": source_sha256(), "mlx": [version(p) for p in ("mlx", "mlx-lm")]}


_SOURCE: str | None = None


def source_sha256(root: Path = PACKAGE_ROOT) -> str:
    """Digest of every .py file and profile in the package: a code fix must not reuse an old stage verdict."""
    global _SOURCE
    if _SOURCE is None or root != PACKAGE_ROOT:
        digest = hashlib.sha256()
        for file in sorted([*root.rglob("*.py"), *root.rglob("*.yaml")]):
            if "__pycache__" not in file.parts:
                digest.update(f"{file.relative_to(root).as_posix()}\0".encode() + file.read_bytes())
        if root != PACKAGE_ROOT:
            return digest.hexdigest()
        _SOURCE = digest.hexdigest()
    return _SOURCE


def path_identity(path: str | Path) -> dict[str, str] | None:
    """{"path", "sha256"} of a file or folder (None when absent): which bytes a verdict judged."""
    path = Path(path)
    if path.is_file():
        return {"path": str(path), "sha256": file_sha256(path)}
    if path.is_dir():
        return {"path": str(path), "sha256": dir_sha256(path)[0]}
    return None
