"""Run history: records made from reports, and a log that survives a torn line."""

from __future__ import annotations

import json
import subprocess

import pytest

from finetune.report import history
from tests.unit.report.report_builders import CONFIG, ENV, make_report


def rec(report, commit="c" * 40):
    """The history record of a report, with a fixed commit (no git call)."""
    return history.record_from_report(report, commit=commit)


def test_append_and_load_survive_a_torn_last_line(tmp_path):
    path = tmp_path / "deep" / "history.jsonl"
    first, second = rec(make_report(when="t1")), rec(make_report(when="t2"))
    history.append(first, path)
    history.append(second, path)
    with open(path, "a") as fh:  # a crash in the middle of a write
        fh.write('{"command": "run", "status": "pas')
    assert [r["when"] for r in history.load(path)] == ["t1", "t2"]
    history.append(rec(make_report(when="t3")), path)
    rows = history.load(path)
    assert [r["when"] for r in rows] == ["t1", "t2", "t3"], "the torn line must not swallow the next record"
    assert rows[0] == json.loads(json.dumps(first))
    assert path.read_text().count("\n") == 4  # the torn fragment stays on a line of its own


def test_a_users_own_history_jsonl_is_never_appended_to(tmp_path):
    path = tmp_path / "history.jsonl"  # output_dir pointed at a folder of the user's that has one
    path.write_text('{"date": "2026-01-01", "note": "mine"}\n')
    with pytest.raises(ValueError, match="is not FineTune's history .* set FT_HISTORY"):
        history.append(rec(make_report(when="t1")), path)
    assert path.read_text() == '{"date": "2026-01-01", "note": "mine"}\n'


def test_load_of_a_missing_file_is_an_empty_history(tmp_path):
    assert history.load(tmp_path / "none.jsonl") == []
    from finetune.report import regressions

    assert regressions.check([]) and not regressions.regressions(regressions.check([]))


def test_history_path_defaults_under_output_dir_and_ft_history_overrides(monkeypatch, tmp_path):
    monkeypatch.delenv("FT_HISTORY", raising=False)
    assert history.history_path("artifacts") == history.Path("artifacts/history.jsonl")
    monkeypatch.setenv("FT_HISTORY", str(tmp_path / "h.jsonl"))
    assert history.history_path("artifacts") == tmp_path / "h.jsonl"


def test_a_record_carries_times_memory_gates_and_digests():
    r = rec(make_report(seconds={"train": 123.0}, peak=812 * 2**20, final_loss=0.42, data_sha="a" * 64))
    assert r["command"] == "run" and r["status"] == "passed" and r["exit_code"] == 0
    assert r["stages"]["train"] == {"status": "passed", "seconds": 123.0, "cached": False}
    assert r["seconds"] == pytest.approx(2 + 5 + 0.5 + 123 + 20)
    assert r["peak_memory_bytes"] == 812 * 2**20
    assert r["final_train_loss"] == 0.42
    assert r["gates"]["loss_convergence"] == {"status": "passed", "measured": 0.2, "threshold": 0.95}
    assert r["data_digest"] == "a" * 64 and r["commit"] == "c" * 40 and r["code_version"] == "0.2.0+abc"
    assert len(r["env_digest"]) == len(r["config_digest"]) == 64


def test_digests_ignore_output_paths_and_free_memory_but_not_what_the_run_is():
    base = rec(make_report())
    moved = rec(
        make_report(
            config={**CONFIG, "output_dir": "/elsewhere"}, env={**ENV, "memory": {"available_bytes": 1}}
        )
    )
    assert moved["config_digest"] == base["config_digest"] and moved["env_digest"] == base["env_digest"]
    lr = rec(make_report(config={**CONFIG, "training": {**CONFIG["training"], "learning_rate": 1e-3}}))
    assert lr["config_digest"] != base["config_digest"]
    other_blas = rec(
        make_report(env={**ENV, "blas": {**ENV["blas"], "active": "reference", "library": "/x.so"}})
    )
    assert other_blas["env_digest"] != base["env_digest"]
    assert rec(make_report(data_sha="e" * 64))["data_digest"] != base["data_digest"]


def test_final_loss_comes_from_metrics_when_no_gate_judged_it(tmp_path):
    rows = [{"kind": "train", "step": s, "train_loss": 3.0 - 0.1 * s} for s in range(1, 21)]
    rows.append({"kind": "val", "step": 20, "val_loss": 1.5})
    (tmp_path / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    r = rec(make_report("train", status="not_judged", run_dir=str(tmp_path)))
    assert r["gates"] == {}
    assert r["final_train_loss"] == pytest.approx(3.0 - 0.1 * 18)  # mean of the last 5 steps (16..20)


def test_git_commit_is_head_inside_a_repo_and_none_outside(tmp_path):
    assert history.git_commit(tmp_path) is None
    git = ["git", "-C", str(tmp_path), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    subprocess.run([*git, "commit", "-q", "--allow-empty", "-m", "x"], check=True)
    head = subprocess.run(
        [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    assert history.git_commit(tmp_path) == head


def test_a_record_from_before_schema_3_names_its_command_tier_and_still_loads(tmp_path):
    path = tmp_path / "history.jsonl"
    path.write_text(
        '{"tier": "run", "status": "passed"}\n{"command": "pipeline", "status": "failed"}\n{"x": 1}\n'
    )
    assert [(r["command"], r["status"]) for r in history.load(path)] == [
        ("run", "passed"),
        ("pipeline", "failed"),
    ]
