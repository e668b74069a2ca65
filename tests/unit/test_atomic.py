"""Atomic writes leave either the old file or the new one, never a half-written one."""

import os
import stat

import pytest

from finetune.atomic import atomic_dir, atomic_write_json, atomic_write_text


def test_write_replaces_and_keeps_normal_mode(tmp_path):
    path = tmp_path / "a" / "x.txt"
    atomic_write_text(path, "one")
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    umask = os.umask(0)
    os.umask(umask)
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask
    assert os.listdir(path.parent) == ["x.txt"]


def test_failed_write_keeps_the_old_file_and_no_temp(tmp_path, monkeypatch):
    path = tmp_path / "x.json"
    atomic_write_json(path, {"a": 1})

    def crash(*_args):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", crash)  # the crash lands between writing and renaming
    with pytest.raises(OSError, match="disk full"):
        atomic_write_json(path, {"a": 2})
    assert path.read_text() == '{\n  "a": 1\n}\n' and os.listdir(tmp_path) == ["x.json"]


def test_atomic_dir_replaces_whole_folder_or_nothing(tmp_path):
    final = tmp_path / "adapter"
    with atomic_dir(final) as tmp:
        (tmp / "w.bin").write_bytes(b"1")
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "w.bin").write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert (final / "w.bin").read_bytes() == b"1" and os.listdir(tmp_path) == ["adapter"]
    with atomic_dir(final) as tmp:
        (tmp / "v.bin").write_bytes(b"2")
    assert os.listdir(final) == ["v.bin"]
