"""finetune.system.owned: FineTune writes only into a folder it created or one holding its marker."""

from __future__ import annotations

import pytest

from finetune.system.owned import MARKER, NotOwned, claim, is_owned


def test_a_new_folder_is_created_and_marked(tmp_path):
    folder = claim(tmp_path / "a" / "b")
    assert folder.is_dir() and is_owned(folder) and [p.name for p in folder.iterdir()] == [MARKER]
    assert claim(folder) == folder, "a marked folder is claimed again as is"


def test_an_empty_folder_is_marked(tmp_path):
    assert is_owned(claim(tmp_path)) and [p.name for p in tmp_path.iterdir()] == [MARKER]


def test_a_folder_holding_files_is_refused_and_left_as_it_was(tmp_path):
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "train.jsonl").write_text("mine\n")
    (tmp_path / "config.yaml").write_text("model: {name: smollm2-135m}\n")  # a config alone is no marker
    with pytest.raises(
        NotOwned, match=r"--out .*: the folder exists, is not empty \(config\.yaml, data\)"
    ) as e:
        claim(tmp_path, flag="--out")
    assert f"touch {tmp_path / MARKER}" in str(e.value) and "nothing was written" in str(e.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.yaml", "data"]


def test_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(NotOwned, match="a file, not a folder"):
        claim(tmp_path / "f")
    assert (tmp_path / "f").read_text() == "x"
