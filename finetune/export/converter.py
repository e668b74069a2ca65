"""llama.cpp's own HF -> GGUF converter, fetched from the xllamacpp sdist on PyPI (no `pip download`, no build).

The xllamacpp sdist vendors llama.cpp under `thirdparty/llama.cpp/`; the runtime wheel of the same version is
built from that very tree, so the converter and the runtime that loads its output match. Only the converter's
own files are extracted (214 files, 2.5 MB of 37.7 MB; ~3 s): convert_hf_to_gguf.py, convert_lora_to_gguf.py,
LICENSE (MIT), conversion/ (the model classes), gguf-py/ (its own gguf package: PyPI gguf 0.19 lacks what it
uses), models/templates/ (chat templates some converters read), requirements/.

    python -m finetune.export.converter      # `make setup` runs this: fetch once into the cache
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import json
import os
import shutil
import sys
import tarfile
import tempfile
import time
import urllib.request
from pathlib import Path, PurePosixPath

PACKAGE = "xllamacpp"
VERSION = "2026.10.11549"
SDIST = f"{PACKAGE}-{VERSION}.tar.gz"
# Pinned: the index must report the same hash, and the downloaded bytes must match it.
SDIST_SHA256 = "c17ee1163006f70726abb9f72137830818f3d8cb60bfc34cb232d08428eaa22b"
SDIST_SIZE = 37_722_765
SIMPLE_INDEX = f"https://pypi.org/simple/{PACKAGE}/"
PREFIX = f"{PACKAGE}-{VERSION}/thirdparty/llama.cpp/"
WANTED_FILES = ("convert_hf_to_gguf.py", "convert_lora_to_gguf.py", "LICENSE")
WANTED_DIRS = ("conversion/", "gguf-py/", "models/templates/", "requirements/")
MARKER = ".fetched.json"


def default_dest() -> Path:
    return Path(os.environ.get("FT_CACHE_DIR") or Path.home() / ".cache" / "finetune") / "tools"


def runtime_version() -> str | None:
    """The installed xllamacpp (the llama.cpp runtime FineTune checks GGUFs with), if any."""
    try:
        return importlib.metadata.version(PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        return None


class FetchError(RuntimeError):
    """The sdist could not be found, downloaded, verified or unpacked."""


def _sdist_url(timeout: float) -> tuple[str, str]:
    """(url, sha256) of the sdist from PyPI's JSON simple index (PEP 691). The /pypi/<p>/<v>/json API 404s
    behind this machine's proxy; the simple index works."""
    req = urllib.request.Request(SIMPLE_INDEX, headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(req, timeout=timeout) as resp:
        index = json.load(resp)
    for f in index.get("files", []):
        if f.get("filename") == SDIST:
            return f["url"], f["hashes"]["sha256"]
    raise FetchError(f"{SIMPLE_INDEX}: no {SDIST} in the index")


def _wanted(name: str) -> str | None:
    """The member's path relative to the llama.cpp tree if it is one we extract, else None."""
    if not name.startswith(PREFIX):
        return None
    rel = name[len(PREFIX) :]
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or ".." in p.parts:
        return None
    if rel in WANTED_FILES or any(rel.startswith(d) for d in WANTED_DIRS):
        return rel
    return None


def fetch_converter(dest: Path | None = None, *, timeout: float = 300.0) -> Path:
    """Return dest/<sdist stem>/ holding convert_hf_to_gguf.py and friends, downloading it once.

    Idempotent (a marker file records a finished extraction) and atomic (extract into a temp dir next to
    the target, then rename); the sdist's sha256 is checked against both the pinned value and PyPI's index.
    """
    dest = Path(dest or default_dest()).expanduser()
    target = dest / f"{PACKAGE}-{VERSION}-llama.cpp"
    if (target / MARKER).is_file() and (target / "convert_hf_to_gguf.py").is_file():
        return target
    dest.mkdir(parents=True, exist_ok=True)
    t0 = time.monotonic()
    url = _pinned_url(timeout)
    tmp = Path(tempfile.mkdtemp(prefix=".fetch-", dir=dest))
    try:
        archive = tmp / SDIST
        _download(url, archive, timeout)
        t_download = time.monotonic() - t0
        tree = tmp / "tree"
        n_files, n_bytes = _extract(archive, tree)
        if (
            not (tree / "convert_hf_to_gguf.py").is_file()
            or not (tree / "conversion" / "__init__.py").is_file()
        ):
            raise FetchError(f"{SDIST}: no {PREFIX}convert_hf_to_gguf.py / conversion/ inside")
        marker = {
            "sdist": SDIST,
            "url": url,
            "sha256": SDIST_SHA256,
            "files": n_files,
            "bytes": n_bytes,
            "download_s": round(t_download, 2),
            "total_s": round(time.monotonic() - t0, 2),
        }
        (tree / MARKER).write_text(json.dumps(marker, indent=1))
        _move_into_place(tree, target, dest)
        return target
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _pinned_url(timeout: float) -> str:
    """The sdist's URL, once PyPI's index confirms the pinned hash."""
    try:
        url, index_sha = _sdist_url(timeout)
    except OSError as exc:
        raise FetchError(
            f"cannot reach PyPI ({SIMPLE_INDEX}) to fetch llama.cpp's converter: {exc}; "
            "run `make setup` where PyPI is reachable"
        ) from exc
    if index_sha != SDIST_SHA256:
        raise FetchError(f"{SIMPLE_INDEX}: {SDIST} sha256 {index_sha} != pinned {SDIST_SHA256}")
    return url


def _download(url: str, archive: Path, timeout: float) -> None:
    h = hashlib.sha256()
    with urllib.request.urlopen(url, timeout=timeout) as resp, open(archive, "wb") as out:
        while chunk := resp.read(1 << 20):
            h.update(chunk)
            out.write(chunk)
    if h.hexdigest() != SDIST_SHA256:
        raise FetchError(f"{url}: sha256 {h.hexdigest()} != {SDIST_SHA256} (corrupt or changed download)")


def _extract(archive: Path, tree: Path) -> tuple[int, int]:
    """Only the converter's members (see _wanted) into tree; returns (files, bytes) written."""
    n_files = n_bytes = 0
    with tarfile.open(archive, "r:gz") as tar:
        for m in tar:
            rel = _wanted(m.name)
            if rel is None:
                continue
            out_path = tree / rel
            if m.isdir():
                out_path.mkdir(parents=True, exist_ok=True)
            elif m.isfile():
                out_path.parent.mkdir(parents=True, exist_ok=True)
                src = tar.extractfile(m)
                assert src is not None
                with src, open(out_path, "wb") as f:
                    shutil.copyfileobj(src, f)
                os.chmod(out_path, 0o755 if m.mode & 0o111 else 0o644)
                n_files += 1
                n_bytes += m.size
            # symlinks and other members are skipped: the converter tree has none
    return n_files, n_bytes


def _move_into_place(tree: Path, target: Path, dest: Path) -> None:
    try:
        os.rename(tree, target)
    except OSError:
        if not (target / MARKER).is_file():  # lost a race to a finished copy: fine; otherwise a stale dir
            stale = dest / f".stale-{os.getpid()}-{time.time_ns()}"
            os.rename(target, stale)
            shutil.rmtree(stale, ignore_errors=True)
            os.rename(tree, target)


def main() -> int:
    try:
        tree = fetch_converter()
    except FetchError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    have = runtime_version()
    note = "" if have in (None, VERSION) else f" (WARNING: the installed xllamacpp runtime is {have})"
    print(f"llama.cpp converter {VERSION}: {tree}{note}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
