"""finetune.report.artifacts: a file or folder a stage wrote, identified by size and sha256."""

import hashlib

import pytest

from finetune.report.artifacts import artifact, artifact_intact
from finetune.system.hashing import dir_sha256


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
