"""finetune.report.artifacts: a file or folder a stage wrote, identified by size and sha256; intact by content."""

import hashlib
import shutil

import pytest

from finetune.report.artifacts import artifact, artifact_changes, artifact_intact
from finetune.system.hashing import dir_manifest, dir_sha256


def test_artifact_of_a_file_and_a_folder(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    a = artifact("w", f)
    assert (a.name, a.path, a.kind, a.bytes, a.sha256) == (
        "w",
        str(f),
        "file",
        3,
        hashlib.sha256(b"abc").hexdigest(),
    )
    d = tmp_path / "dir"
    (d / "sub").mkdir(parents=True)
    (d / "a.txt").write_text("1")
    (d / "sub" / "b.txt").write_text("22")
    first = artifact("d", d)
    assert (first.kind, first.bytes, first.sha256) == ("dir", 3, dir_sha256(d)[0])
    assert artifact_intact(first)
    (d / "sub" / "b.txt").write_text("33")  # same size, other content: a new digest
    assert artifact("d", d).sha256 != first.sha256


def test_artifact_intact_fails_when_a_file_changes_size_or_disappears(tmp_path):
    f = tmp_path / "w.bin"
    f.write_bytes(b"abc")
    a = artifact("w", f)
    f.write_bytes(b"abcd")
    assert not artifact_intact(a)
    f.unlink()
    assert not artifact_intact(a.model_dump())
    with pytest.raises(FileNotFoundError, match="artifact w: .*w.bin does not exist"):
        artifact("w", f)


def test_artifact_intact_for_folders_and_kind_changes(tmp_path):
    d = tmp_path / "adapter"
    d.mkdir()
    (d / "x").write_bytes(b"12345")
    a = artifact("adapter", d)
    (d / "y").write_bytes(b"6")
    assert not artifact_intact(a)  # a file added
    (d / "y").unlink()
    assert artifact_intact(a.model_dump())
    for p in d.iterdir():
        p.unlink()
    d.rmdir()
    d.write_bytes(b"12345")  # same size, but a file where a folder was
    assert not artifact_intact(a)


def test_a_same_sized_file_with_other_bytes_is_not_intact_and_is_named(tmp_path):
    f = tmp_path / "adapters.safetensors"
    f.write_bytes(b"trained!")
    a = artifact("adapter", f)
    f.write_bytes(b"step-0!!")  # what a size check would call intact
    assert not artifact_intact(a) and not artifact_intact(a.model_dump())
    (change,) = artifact_changes(a)
    assert (change.recorded, change.now) == (a.sha256, hashlib.sha256(b"step-0!!").hexdigest())
    assert change.describe(tmp_path) == (
        f"adapters.safetensors changed since it was recorded (sha256 {a.sha256[:12]}… → {change.now[:12]}…)"
    )
    f.write_bytes(b"trained!")
    assert artifact_intact(a) and artifact_changes(a) == []


def test_a_folder_names_its_changed_added_and_missing_files_from_the_recorded_manifest(tmp_path):
    d = tmp_path / "adapter"
    (d / "sub").mkdir(parents=True)
    (d / "adapters.safetensors").write_bytes(b"AAAA")
    (d / "sub" / "config.json").write_text("{}")
    a, files = artifact("adapter", d), dir_manifest(d)
    (d / "adapters.safetensors").write_bytes(b"BBBB")  # same size, same total
    assert not artifact_intact(a)
    (d / "sub" / "config.json").unlink()
    (d / "extra.bin").write_bytes(b"1")
    said = [c.describe(tmp_path) for c in artifact_changes(a, files)]
    assert said == [
        f"adapter/adapters.safetensors changed since it was recorded (sha256 {files['adapters.safetensors'][:12]}… → "
        f"{hashlib.sha256(b'BBBB').hexdigest()[:12]}…)",
        f"adapter/extra.bin appeared since it was recorded (sha256 {hashlib.sha256(b'1').hexdigest()[:12]}…)",
        f"adapter/sub/config.json is missing (recorded sha256 {files['sub/config.json'][:12]}…)",
    ]
    # without a manifest (or one that is not the recorded folder's) the folder itself is named
    assert [c.path for c in artifact_changes(a)] == [d]
    assert [c.path for c in artifact_changes(a, {"adapters.safetensors": "0" * 64})] == [d]
    shutil.rmtree(d)
    assert [c.describe(tmp_path) for c in artifact_changes(a, files)] == [
        f"adapter is missing (recorded sha256 {a.sha256[:12]}…)"
    ]
