"""finetune.system.hashing: digests of files, folders, JSON values and of the package's own source."""

import hashlib
import json
import os
import shutil
import time

import pytest

from finetune.system import hashing


def sha(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def test_file_sha256_is_the_real_digest_and_follows_changes(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    assert hashing.file_sha256(f) == sha(b"abc")
    assert hashing.file_sha256(str(f)) == sha(b"abc")  # str and Path alike
    f.write_bytes(b"abcd" * 300_000)  # bigger than one read chunk
    assert hashing.file_sha256(f) == sha(b"abcd" * 300_000)
    with pytest.raises(FileNotFoundError):
        hashing.file_sha256(tmp_path / "missing")


def test_dir_sha256_covers_relative_paths_and_contents(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("1")
    (d / "sub" / "b.txt").write_text("22")
    digest, total = hashing.dir_sha256(d)
    expected = hashlib.sha256(f"a.txt\0{sha(b'1')}\nsub/b.txt\0{sha(b'22')}\n".encode()).hexdigest()
    assert (digest, total) == (expected, 3)

    copy = shutil.copytree(d, tmp_path / "elsewhere")
    assert hashing.dir_sha256(copy) == (digest, 3)  # where the folder lives does not matter
    (copy / "sub" / "b.txt").rename(copy / "sub" / "c.txt")  # same bytes, other name
    assert hashing.dir_sha256(copy)[0] != digest
    (d / "sub" / "b.txt").write_text("33")  # same size, other content
    assert hashing.dir_sha256(d) != (digest, 3) and hashing.dir_sha256(d)[1] == 3
    (tmp_path / "empty").mkdir()
    assert hashing.dir_sha256(tmp_path / "empty") == (sha(b""), 0)


def test_the_memo_sees_a_same_sized_copy_that_keeps_the_mtime(tmp_path):
    trained, init = tmp_path / "adapter.bin", tmp_path / "init.bin"
    init.write_bytes(b"step-0")
    trained.write_bytes(b"final!")
    os.utime(init, ns=(trained.stat().st_atime_ns, trained.stat().st_mtime_ns))  # one tick, as a fast trainer
    assert hashing.file_sha256(trained) == sha(b"final!")  # memoised now
    time.sleep(0.02)  # past one tick of a kernel with coarse timestamps
    shutil.copy2(init, trained)  # same size, same mtime, same inode: only ctime says it changed
    assert hashing.file_sha256(trained) == sha(b"step-0")


def test_a_manifest_names_each_file_and_gives_the_folder_digest(tmp_path):
    d = tmp_path / "d"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("1")
    (d / "sub" / "b.txt").write_text("22")
    files = hashing.dir_manifest(d)
    assert files == {"a.txt": sha(b"1"), "sub/b.txt": sha(b"22")}
    assert hashing.manifest_sha256(files) == hashing.dir_sha256(d)[0]
    assert hashing.manifest_sha256(dict(reversed(files.items()))) == hashing.dir_sha256(d)[0]


def test_json_sha256_ignores_key_order_but_not_values():
    a = {"lora": {"rank": 8, "scale": 20.0}, "seed": 0}
    b = {"seed": 0, "lora": {"scale": 20.0, "rank": 8}}
    assert hashing.json_sha256(a) == hashing.json_sha256(b)
    assert hashing.json_sha256(a) == sha(json.dumps(a, sort_keys=True).encode())
    assert hashing.json_sha256({**a, "seed": 1}) != hashing.json_sha256(a)


def copy_package(dest):
    return shutil.copytree(hashing.PACKAGE_ROOT, dest, ignore=shutil.ignore_patterns("__pycache__"))


def test_source_sha256_covers_code_and_profiles_only(tmp_path):
    root = copy_package(tmp_path / "finetune")
    assert hashing.source_sha256(root) == hashing.source_sha256()  # the package's own, wherever it lives
    base = hashing.source_sha256(root)

    (root / "__pycache__").mkdir(exist_ok=True)
    (root / "__pycache__" / "x.py").write_text("compiled noise")
    (root / "notes.txt").write_text("not code")
    assert hashing.source_sha256(root) == base

    profile = root / "config" / "profiles" / "quick.yaml"
    profile.write_text(profile.read_text() + "# changed\n")
    assert hashing.source_sha256(root) != base
    profile.write_text(profile.read_text().removesuffix("# changed\n"))
    assert hashing.source_sha256(root) == base

    (root / "errors.py").write_text((root / "errors.py").read_text() + "\n")
    assert hashing.source_sha256(root) != base


def test_path_identity_of_a_file_a_folder_or_nothing(tmp_path):
    f = tmp_path / "model.gguf"
    f.write_bytes(b"GGUF weights")
    assert hashing.path_identity(f) == {"path": str(f), "sha256": hashlib.sha256(b"GGUF weights").hexdigest()}
    folder = tmp_path / "adapter"
    folder.mkdir()
    (folder / "adapters.safetensors").write_bytes(b"one")
    first = hashing.path_identity(folder)
    assert first["path"] == str(folder) and len(first["sha256"]) == 64
    (folder / "adapters.safetensors").write_bytes(b"two")
    assert hashing.path_identity(folder)["sha256"] != first["sha256"]  # other bytes, other identity
    assert hashing.path_identity(tmp_path / "missing") is None


def test_an_mlx_measurement_is_keyed_on_this_code_and_the_installed_mlx():
    from importlib.metadata import version

    from finetune.system.hashing import mlx_measurement_versions, source_sha256

    assert mlx_measurement_versions() == {"code": source_sha256(), "mlx": [version("mlx"), version("mlx-lm")]}
