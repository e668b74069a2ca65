"""finetune.models.cache: the cache root, and folders built once, atomically, under a lock."""

import json
import threading
import time
from pathlib import Path

import pytest

from finetune.errors import UserError
from finetune.models.cache import MARKER, ModelUnavailable, build_once, cache_root, is_built


def test_cache_root_prefers_argument_then_env(tmp_path, monkeypatch):
    assert cache_root(tmp_path, {"FT_CACHE_DIR": "/elsewhere"}) == tmp_path
    assert cache_root(None, {"FT_CACHE_DIR": "/elsewhere"}) == Path("/elsewhere")
    assert cache_root(None, {"FT_CACHE_DIR": ""}) == Path.home() / ".cache" / "finetune"
    assert cache_root(None, {}) == Path.home() / ".cache" / "finetune"
    monkeypatch.setenv("FT_CACHE_DIR", str(tmp_path / "from-env"))
    assert cache_root() == tmp_path / "from-env"


def test_model_unavailable_is_a_user_error():
    assert issubclass(ModelUnavailable, UserError)


def test_build_once_builds_once_under_concurrency(tmp_path):
    calls = []

    def build(tmp):
        calls.append(tmp)
        time.sleep(0.3)  # long enough that the second caller waits on the lock
        (tmp / "weights").write_text("x")
        return {"spec": "t"}

    target = tmp_path / "models" / "t"
    (target.parent / ".t.tmp-killed").mkdir(parents=True)  # debris of a build that was SIGKILLed
    results = []
    threads = [
        threading.Thread(target=lambda: results.append(build_once(target, build, log=lambda _m: None)))
        for _ in range(2)
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(calls) == 1 and results == [target, target]
    assert (target / "weights").read_text() == "x" and is_built(target)
    assert sorted(p.name for p in target.parent.iterdir()) == [".locks", "t"]  # no temp dirs left
    assert oct((target / "weights").stat().st_mode & 0o777) == "0o644"
    assert oct(target.stat().st_mode & 0o777) == "0o755"


def test_marker_records_the_build(tmp_path):
    target = build_once(tmp_path / "t", lambda tmp: {"spec": "t", "seed": 3}, log=lambda _m: None)
    marker = json.loads((target / MARKER).read_text())
    assert marker["spec"] == "t" and marker["seed"] == 3 and marker["build_seconds"] >= 0
    assert build_once(target, lambda tmp: pytest.fail("a built folder is not rebuilt")) == target


def test_build_once_failure_leaves_nothing(tmp_path):
    def build(tmp):
        (tmp / "half").write_text("x")
        raise RuntimeError("conversion crashed")

    target = tmp_path / "models" / "t"
    with pytest.raises(RuntimeError, match="conversion crashed"):
        build_once(target, build)
    assert not target.exists() and [p.name for p in target.parent.iterdir()] == [".locks"]


def test_build_once_replaces_an_incomplete_folder(tmp_path):
    target = tmp_path / "t"
    target.mkdir()
    (target / "stale").write_text("from a crashed run")
    logged = []
    build_once(target, lambda tmp: (tmp / "fresh").write_text("ok") and {}, log=logged.append)
    assert sorted(p.name for p in target.iterdir()) == [MARKER, "fresh"]
    assert logged == [f"removing incomplete model folder {target}"]
    assert not is_built(tmp_path / "never")
