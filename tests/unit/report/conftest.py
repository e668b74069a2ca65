"""A healthy run report as plain data, shared by the report tests (each test gets its own copy)."""

import pytest


def healthy_report() -> dict:
    stage = {"name": "prepull", "status": "passed", "seconds": 0.1, "digest": "d" * 64,
             "artifacts": [{"name": "m", "path": "/x", "kind": "file", "bytes": 3, "sha256": "a" * 64}]}  # fmt: skip
    return {
        "command": "pipeline",
        "status": "passed",
        "exit_code": 0,
        "profile": "release",
        "model": "smollm2-135m",
        "run_dir": "/tmp/run",
        "code_version": "0.2.0+" + "c" * 64,
        "started_at": "2026-01-01T00:00:00+00:00",
        "finished_at": "2026-01-01T00:01:00+00:00",
        "seconds": 60.0,
        "config": {"model": {"name": "smollm2-135m"}},
        "stages": [stage],
        "gates": [
            {"name": "output_parity", "status": "passed", "measured": 1.0, "threshold": 0.9, "detail": "ok"}
        ],
        "scores": [
            {
                "runtime": "ollama",
                "train": {"n": 2, "exact": 1, "contains": 2, "score": 1.0},
                "heldout": {"n": 2, "exact": 0, "contains": 1, "score": 0.5},
            }
        ],  # fmt: skip
        "ollama": {
            "status": "passed",
            "deleted": True,
            "server_stopped": True,
            "served_checks": [{"name": "generate", "passed": True, "detail": "ok"}],
        },  # fmt: skip
        "environment": {"python": "3.11"},
    }


@pytest.fixture
def healthy() -> dict:
    return healthy_report()
