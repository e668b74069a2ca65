"""finetune.system.atomic: writes leave either the old file/folder or the new one, never a half-written one."""

import json
import os
import stat

import pytest

from finetune.system.atomic import (
    atomic_dir,
    atomic_write_bytes,
    atomic_write_json,
    atomic_write_text,
    remove_stale_temporaries,
)


def umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def test_write_replaces_and_keeps_normal_mode(tmp_path):
    path = tmp_path / "a" / "x.txt"
    assert atomic_write_text(path, "one") == path
    atomic_write_text(path, "two")
    assert path.read_text() == "two"
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~umask()
    assert os.listdir(path.parent) == ["x.txt"]


def test_bytes_text_and_json_round_trip(tmp_path):
    atomic_write_bytes(tmp_path / "b.bin", b"\x00\xff")
    atomic_write_text(tmp_path / "t.txt", "Velmora \u00bd")
    atomic_write_json(tmp_path / "j.json", {"b": 1, "a": [1, 2], "p": tmp_path})
    assert (tmp_path / "b.bin").read_bytes() == b"\x00\xff"
    assert (tmp_path / "t.txt").read_bytes() == "Velmora \u00bd".encode()
    text = (tmp_path / "j.json").read_text()
    assert text.endswith("}\n") and list(json.loads(text)) == ["b", "a", "p"]  # key order kept
    assert json.loads(text)["p"] == str(tmp_path)  # non-JSON values are written as text


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
        assert tmp.parent == tmp_path and tmp != final
        (tmp / "w.bin").write_bytes(b"1")
    assert stat.S_IMODE(final.stat().st_mode) == 0o777 & ~umask()  # not mkdtemp's 0700
    with pytest.raises(RuntimeError), atomic_dir(final) as tmp:
        (tmp / "w.bin").write_bytes(b"half")
        raise RuntimeError("crash mid-write")
    assert (final / "w.bin").read_bytes() == b"1" and os.listdir(tmp_path) == ["adapter"]
    with atomic_dir(final) as tmp:
        (tmp / "v.bin").write_bytes(b"2")
    assert os.listdir(final) == ["v.bin"]
    assert os.listdir(tmp_path) == ["adapter"]  # no .old or temp folder left behind


def test_keyboard_interrupt_inside_atomic_dir_cleans_up(tmp_path):
    with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "out") as tmp:
        (tmp / "part").write_text("x")
        raise KeyboardInterrupt
    assert os.listdir(tmp_path) == []


def test_stale_temporaries_of_killed_writers_are_removed_and_nothing_else(tmp_path):
    (tmp_path / "adapter").mkdir()
    (tmp_path / "adapter" / ".adapters.safetensors.ab12.tmp").write_bytes(b"x" * 10)
    half_dir = tmp_path / ".checkpoints.cd34.tmp"
    (half_dir / "inner").mkdir(parents=True)
    (half_dir / "inner" / "w.safetensors").write_bytes(b"y" * 7)
    (half_dir / "inner" / ".nested.tmp").write_bytes(b"z")  # inside a removed folder: counted once
    (tmp_path / ".fused.old").mkdir()
    keep = [tmp_path / "adapter" / "adapters.safetensors", tmp_path / "notes.tmp", tmp_path / ".hidden"]
    for path in keep:
        path.write_bytes(b"k")
    removed = {p.relative_to(tmp_path).as_posix(): size for p, size in remove_stale_temporaries(tmp_path)}
    assert removed == {
        ".checkpoints.cd34.tmp": 8,
        ".fused.old": 0,
        "adapter/.adapters.safetensors.ab12.tmp": 10,
    }
    assert all(p.exists() for p in keep) and not half_dir.exists()
    assert remove_stale_temporaries(tmp_path) == []
