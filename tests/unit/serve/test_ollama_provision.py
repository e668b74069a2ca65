"""Provisioning with fake wheels (no network), the SYCL stub itself, and finding a binary."""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import zipfile
from pathlib import Path

import pytest

from finetune.serve import ollama_provision as prov
from finetune.serve.ollama_provision import (
    BINARY_ENV,
    STAMP_NAME,
    STUB_LIB,
    WHEELS,
    ProvisionError,
    check_links,
    locate_ollama,
    provision,
)

needs_gcc = pytest.mark.skipif(shutil.which("gcc") is None, reason="needs gcc to build the SYCL stub")


def _make_wheels(folder: Path, *, drop: str | None = None) -> None:
    """Wheels shaped like the real ones: members under nested folders, some under .data/data/lib."""
    folder.mkdir(parents=True, exist_ok=True)
    for wheel in WHEELS:
        stem = f"{wheel.name.replace('-', '_')}-{wheel.version}"
        with zipfile.ZipFile(folder / f"{stem}-py3-none-manylinux_2_28_x86_64.whl", "w") as zf:
            zf.writestr(f"{stem}.dist-info/METADATA", f"Name: {wheel.name}\n")
            zf.writestr(f"{stem}.data/data/lib/unrelated.so", b"not wanted")
            for member in wheel.members:
                if member != drop:
                    zf.writestr(f"{stem}.data/data/lib/{member}", f"content of {member}".encode())


class FakeDownload:
    def __init__(self, source: Path) -> None:
        self.source = source
        self.calls: list[list[str]] = []

    def __call__(self, specs, dest: Path) -> None:
        self.calls.append(list(specs))
        for whl in self.source.glob("*.whl"):
            shutil.copy(whl, dest / whl.name)


def _fake_compile(source: Path, out: Path) -> None:
    out.write_bytes(b"stub built from " + source.name.encode())


def _provision(dest: Path, wheels: Path, **kw):
    kw.setdefault("download", FakeDownload(wheels))
    kw.setdefault("compile_c", _fake_compile)
    kw.setdefault("check", lambda binary: None)
    kw.setdefault("version_of", lambda binary: "0.0.0-fake")
    kw.setdefault("log", lambda msg: None)
    return provision(dest, **kw)


def test_provision_lays_out_binary_libraries_stub_and_stamp(tmp_path: Path) -> None:
    _make_wheels(tmp_path / "wheels")
    download = FakeDownload(tmp_path / "wheels")
    result = _provision(tmp_path / "ollama", tmp_path / "wheels", download=download)

    bin_dir = tmp_path / "ollama" / "bin"
    assert result.installed and result.binary == bin_dir / "ollama"
    assert download.calls == [[f"{w.name}=={w.version}" for w in WHEELS]]
    assert (bin_dir / "ollama").read_bytes() == b"content of ollama-lib"
    assert not (bin_dir / "ollama").is_symlink() and os.access(bin_dir / "ollama", os.X_OK)
    assert (bin_dir / STUB_LIB).read_bytes() == b"stub built from ollama_sycl_stub.c"
    expected = {target for w in WHEELS for target in w.members.values()} | {STUB_LIB}
    assert {p.name for p in bin_dir.iterdir()} == expected
    stamp = json.loads((tmp_path / "ollama" / STAMP_NAME).read_text())
    assert stamp["ollama_version"] == "0.0.0-fake"
    assert stamp["wheels"] == {w.name: w.version for w in WHEELS}
    assert result.size_bytes == sum(p.stat().st_size for p in (tmp_path / "ollama").rglob("*") if p.is_file())


def test_second_run_reuses_the_install_without_downloading(tmp_path: Path) -> None:
    _make_wheels(tmp_path / "wheels")
    _provision(tmp_path / "ollama", tmp_path / "wheels")

    def no_download(specs, dest):
        raise AssertionError("must not download again")

    again = _provision(tmp_path / "ollama", tmp_path / "wheels", download=no_download)
    assert not again.installed and again.binary.is_file()


def test_changed_stub_source_triggers_a_rebuild(tmp_path: Path) -> None:
    _make_wheels(tmp_path / "wheels")
    stub = tmp_path / "stub.c"
    stub.write_text("/* v1 */")
    _provision(tmp_path / "ollama", tmp_path / "wheels", stub=stub)
    stub.write_text("/* v2 */")
    download = FakeDownload(tmp_path / "wheels")
    result = _provision(tmp_path / "ollama", tmp_path / "wheels", stub=stub, download=download)
    assert result.installed and len(download.calls) == 1


def test_failed_check_leaves_no_partial_install(tmp_path: Path) -> None:
    _make_wheels(tmp_path / "wheels")

    def broken(binary: Path) -> None:
        raise ProvisionError(f"{binary} does not link: libsycl.so.8 => not found")

    with pytest.raises(ProvisionError, match="does not link"):
        _provision(tmp_path / "ollama", tmp_path / "wheels", check=broken)
    assert not (tmp_path / "ollama").exists()
    assert list(tmp_path.glob(".ollama*")) == []


def test_failed_rebuild_keeps_the_previous_install(tmp_path: Path) -> None:
    _make_wheels(tmp_path / "wheels")
    _provision(tmp_path / "ollama", tmp_path / "wheels")
    with pytest.raises(ProvisionError, match="no wheel for bigdl-core-cpp==2.6.0 was downloaded"):
        _provision(tmp_path / "ollama", tmp_path / "wheels", force=True, download=lambda specs, dest: None)
    assert (tmp_path / "ollama" / "bin" / "ollama").read_bytes() == b"content of ollama-lib"


def test_wheel_missing_a_library_is_named(tmp_path: Path) -> None:
    _make_wheels(tmp_path / "wheels", drop="libiomp5.so")
    with pytest.raises(ProvisionError, match="intel_openmp-2025.0.2-.*lacks libiomp5.so"):
        _provision(tmp_path / "ollama", tmp_path / "wheels")


def test_locate_prefers_env_then_path_then_provisioned(tmp_path: Path) -> None:
    tools = tmp_path / "tools"
    binary = tools / "bin" / "ollama"
    binary.parent.mkdir(parents=True)
    binary.write_text("#!/bin/sh\n")
    binary.chmod(0o755)
    (tools / STAMP_NAME).write_text(json.dumps({"ollama_version": "9.9"}))
    other = tmp_path / "other-ollama"
    other.write_text("#!/bin/sh\n")
    other.chmod(0o755)

    found = locate_ollama(tools, environ={BINARY_ENV: str(other)}, which=lambda name: "/usr/bin/ollama")
    assert (found.binary, found.source) == (other, "env")
    found = locate_ollama(tools, environ={}, which=lambda name: "/usr/bin/ollama")
    assert (found.binary, found.source) == (Path("/usr/bin/ollama"), "path")
    found = locate_ollama(tools, environ={}, which=lambda name: None)
    assert (found.binary, found.source) == (binary, "provisioned") and "9.9" in found.reason


def test_locate_explains_why_there_is_none(tmp_path: Path) -> None:
    found = locate_ollama(tmp_path / "empty", environ={}, which=lambda name: None)
    assert found.binary is None and found.source == "none"
    assert str(tmp_path / "empty") in found.reason
    bad = locate_ollama(tmp_path, environ={BINARY_ENV: str(tmp_path / "nope")}, which=lambda name: None)
    assert bad.binary is None and "not an executable" in bad.reason
    # A binary without the stamp is a half-finished install, not a usable one.
    (tmp_path / "half" / "bin").mkdir(parents=True)
    (tmp_path / "half" / "bin" / "ollama").write_text("")
    assert locate_ollama(tmp_path / "half", environ={}, which=lambda name: None).binary is None


@needs_gcc
def test_stub_skips_sycl_and_copies_weights_unchanged(tmp_path: Path) -> None:
    out = tmp_path / STUB_LIB
    prov.compile_stub(prov.stub_source(), out)
    lib = ctypes.CDLL(str(out))
    lib.ggml_backend_sycl_reg.restype = ctypes.c_void_p
    assert lib.ggml_backend_sycl_reg() is None
    assert lib.ggml_backend_sycl_get_device_count() == 0

    # The fork's loader converts quantized weights through this function into a fresh buffer and
    # uploads that: it must copy n elements' worth of blocks (Q4_1: 32 per 20-byte block).
    convert = lib["_Z26ggml_format_convert_to_xpuPKvPvmi"]
    convert.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    src = bytes(range(256)) * 2  # 512 bytes
    dst = ctypes.create_string_buffer(b"\xff" * 512, 512)
    convert(src, dst, 64, 3)  # 64 Q4_1 elements = 2 blocks = 40 bytes
    assert dst.raw[:40] == src[:40] and dst.raw[40:] == b"\xff" * 472


@needs_gcc
def test_stub_exports_every_symbol_the_ollama_libraries_import(tmp_path: Path) -> None:
    out = tmp_path / STUB_LIB
    prov.compile_stub(prov.stub_source(), out)
    nm = subprocess.run(["nm", "-D", "--defined-only", str(out)], capture_output=True, text=True, check=True)
    exported = {line.split()[-1] for line in nm.stdout.splitlines() if line.strip()}
    needed = {  # from `nm -D --undefined-only` on bigdl-core-cpp 2.6.0's libollama_*.so
        "ggml_backend_sycl_reg",
        "ggml_backend_sycl_init",
        "ggml_backend_sycl_get_device_name",
        "_Z26ggml_format_convert_to_xpuPKvPvmi",
    }
    assert needed <= exported


@needs_gcc
def test_check_links_fails_on_a_missing_library_and_passes_when_present(tmp_path: Path) -> None:
    (tmp_path / "lib.c").write_text("int answer(void) { return 42; }\n")
    (tmp_path / "main.c").write_text("int answer(void);\nint main(void) { return answer() - 42; }\n")
    subprocess.run(["gcc", "-shared", "-fPIC", "-o", "libanswer.so", "lib.c"], cwd=tmp_path, check=True)
    subprocess.run(
        ["gcc", "-o", "main", "main.c", "-L.", "-lanswer", "-Wl,-rpath,$ORIGIN"], cwd=tmp_path, check=True
    )
    check_links(tmp_path / "main")
    (tmp_path / "libanswer.so").unlink()
    with pytest.raises(ProvisionError, match="libanswer.so => not found"):
        check_links(tmp_path / "main")


def test_main_reports_an_existing_binary_on_path(tmp_path: Path, monkeypatch, capsys) -> None:
    fake = tmp_path / "ollama"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    monkeypatch.setenv(BINARY_ENV, str(fake))
    assert prov.main(["--dest", str(tmp_path / "tools")]) == 0
    assert str(fake) in capsys.readouterr().out
    assert not (tmp_path / "tools").exists()


def test_the_stub_source_ships_inside_the_package() -> None:
    stub = prov.stub_source()
    assert stub.name == "ollama_sycl_stub.c" and stub.parent == Path(prov.__file__).parent
    assert "ggml_backend_sycl_reg" in stub.read_text()


def test_missing_stub_source_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(ProvisionError, match="missing stub source"):
        _provision(tmp_path / "ollama", tmp_path / "wheels", stub=tmp_path / "nope.c")


def test_the_tools_dir_is_in_the_checkout() -> None:
    root = Path(prov.__file__).resolve().parents[2]
    assert prov.default_tools_dir() == root / ".tools" / "ollama"


def test_runs_as_a_module_and_reports_an_explicit_binary(tmp_path: Path) -> None:
    import sys

    fake = tmp_path / "ollama"
    fake.write_text("#!/bin/sh\n")
    fake.chmod(0o755)
    root = str(Path(prov.__file__).resolve().parents[2])
    env = {**os.environ, BINARY_ENV: str(fake), "PYTHONPATH": root}
    proc = subprocess.run([sys.executable, "-m", "finetune.serve.ollama_provision", "--dest", str(tmp_path / "t")],
                          capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert f"using {fake}" in proc.stdout and not (tmp_path / "t").exists()
    bad = subprocess.run([sys.executable, "-m", "finetune.serve.ollama_provision", "--bogus"],
                         capture_output=True, text=True, timeout=120, env=env)  # fmt: skip
    assert bad.returncode == 2 and "--bogus" in bad.stderr
