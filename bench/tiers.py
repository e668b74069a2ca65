"""Wall time of the test tiers and of `make test` against their budgets.

Live in every bench run: the pytest part of `make test` (unit + tier 1 + README) and tier 1 alone.
Tiers 2 and 3 take 5-15 minutes, so by default they are read from their latest recorded reports
(artifacts/tier2-last.json, artifacts/<run>/report.json), saying when they were recorded; `--tiers`
runs them live instead.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from bench.stats import Figure, Goal, Section

ROOT = Path(__file__).resolve().parents[1]
# The README's budgets for the three tiers (30 s, 5 min, 15 min); `make test` (unit tests + tier 1, what CI
# runs) gets tier 2's 5 minutes here: an assumption, not a stated goal.
BUDGETS_S = {"make_test": 300.0, "tier1": 30.0, "tier2": 300.0, "tier3": 900.0}
# Speed goals for the tiers' own runs (report seconds, warm model cache), tighter than the budgets.
SPEED_GOALS_S = {"tier2": 45.0, "tier3": 150.0}
DEFAULT_MODEL = "smollm2-135m"
GEMMA = "gemma3-270m"
# Where a run's time goes, against issue 23's goals: (key, tier command, folder prefix, model, what, goal).
# what: a stage's seconds, "run" (the report's), or "judge/train" (the judge stage over the train stage).
STAGE_GOALS = (
    ("smollm2_tier2_judge_ratio", "run", "tier2", DEFAULT_MODEL, "judge/train", 0.5),
    ("smollm2_tier3_evaluate_s", "pipeline", "tier3", DEFAULT_MODEL, "evaluate", 12.0),
    ("gemma_tier2_run_s", "run", "tier2", GEMMA, "run", 100.0),
    ("gemma_tier3_evaluate_s", "pipeline", "tier3", GEMMA, "evaluate", 30.0),
    ("gemma_tier3_run_s", "pipeline", "tier3", GEMMA, "run", 200.0),
)
# As the Makefile's `test` recipe runs it (xdist workers; the wheel and CI-file tests too).
MAKE_TEST = [
    *("-n", "auto", "--maxprocesses", "4"),
    "tests/unit",
    "tests/e2e/test_end_to_end_workflow.py",
    "tests/e2e/test_own_data.py",
    "tests/test_readme.py",
    "tests/test_ci_files.py",
    "tests/test_packaging.py",
]
TIER1 = ["tests/e2e/test_end_to_end_workflow.py", "tests/e2e/test_own_data.py"]
TIER2 = ["tests/e2e/test_end_to_end_real_model.py"]
TIER3 = ["tests/e2e/test_end_to_end_mlx.py"]
SUMMARY = re.compile(r"=*\s*((?:\d+ \w+(?:, )?)+) in [\d.]+s")


def pytest_summary(output: str) -> str:
    """pytest's closing "3 passed, 1 failed in 2.1s" counts, or "" (pure)."""
    found = SUMMARY.findall(output)
    return found[-1] if found else ""


def run_pytest(
    paths: list[str], env_extra: dict[str, str] | None = None, timeout: float = 1800
) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths]
    env = {**os.environ, **(env_extra or {})}
    env.pop("LD_PRELOAD", None)
    tic = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env=env, timeout=timeout)
    return {
        "seconds": time.perf_counter() - tic,
        "exit_code": proc.returncode,
        "summary": pytest_summary(proc.stdout + proc.stderr),
        "command": " ".join(cmd[1:]),
    }


def _mtime(path: Path) -> str:
    return datetime.fromtimestamp(path.stat().st_mtime, UTC).isoformat(timespec="seconds")


def _newest_report(
    artifacts: Path, command: str, prefix: str, model: str | None = None
) -> dict[str, Any] | None:
    """The newest passed report of a tier's runs (artifacts/<prefix>-*/report.json), on the default model
    (SmolLM2) before others: the tier times the README and the speed goals speak of; only `model`'s if given."""
    found = []
    for path in artifacts.glob(f"{prefix}-*/report.json"):
        try:
            data = json.loads(path.read_text())
        except (OSError, json.JSONDecodeError):
            continue
        if not isinstance(data, dict) or "seconds" not in data:
            continue
        if data.get("command", data.get("tier")) != command:  # "tier" in reports before schema 3
            continue
        if model is not None and data.get("model") != model:
            continue
        rank = (
            data.get("status") == "passed",
            data.get("model") == DEFAULT_MODEL,
            data.get("finished_at") or "",
        )
        found.append((rank, path, data))
    if not found:
        return None
    _, path, data = max(found, key=lambda x: x[0])
    return {
        "seconds": data.get("seconds"),
        "status": data.get("status"),
        "model": data.get("model"),
        "recorded": data.get("finished_at") or _mtime(path),
        "source": str(path),
        "stages": {
            st.get("name"): st.get("seconds") for st in data.get("stages") or [] if isinstance(st, dict)
        },
    }


def stage_figures(s: Section, artifacts: Path) -> None:
    """STAGE_GOALS' figures from the newest recorded report of each tier and model (pure but for reading)."""
    rows = []
    for key, command, prefix, model, what, limit in STAGE_GOALS:
        tier = "tier 2" if prefix == "tier2" else "tier 3"
        label = f"{model} {tier}: " + (
            "the run" if what == "run" else what if "/" in what else f"{what} stage"
        )
        unit, text = ("x", f"≤ {limit:g}x") if "/" in what else ("s", f"≤ {limit:g} s")
        goal = Goal("<=", limit, text)
        rec = _newest_report(artifacts, command, prefix, model)
        if rec is None or rec.get("status") != "passed":
            why = (
                "no passed report recorded"
                if rec is None
                else f"the newest report did not pass ({rec['status']})"
            )
            s.add(Figure(f"tiers.{key}", label, None, unit, goal, reason=f"{why}; run the tier on {model}"))
            continue
        stages = rec["stages"]
        if what == "run":
            value = rec["seconds"]
        elif "/" in what:
            top, bottom = (stages.get(x) for x in what.split("/"))
            value = top / bottom if top is not None and bottom else None
        else:
            value = stages.get(what)
        detail = f"from {rec['source']}: " + ", ".join(
            f"{k} {v:.1f} s" for k, v in stages.items() if v is not None
        )
        s.add(Figure(f"tiers.{key}", label, value, unit, goal, detail=detail, recorded=rec["recorded"]))
        rows.append([label, "—" if value is None else f"{value:.2f}", text, rec["recorded"]])
    if rows:
        s.table(["where the time goes", "value", "goal", "recorded"], rows)


def recorded_tier2(artifacts: Path) -> dict[str, Any] | None:
    return _newest_report(artifacts, "run", "tier2")


def recorded_tier3(artifacts: Path) -> dict[str, Any] | None:
    return _newest_report(artifacts, "pipeline", "tier3")


def summarize(live: dict[str, dict], recorded: dict[str, dict | None]) -> Section:
    """live: key -> run_pytest() result; recorded: tier2/tier3 -> recorded report or None (pure)."""
    s = Section("tiers", "Test tiers: wall time against budgets")
    labels = {
        "make_test": "`make test` (pytest part: unit + tier 1 + README)",
        "tier1": "tier 1 (test-e2e-workflow)",
        "tier2": "tier 2 (test-e2e-real-model)",
        "tier3": "tier 3 (test-e2e-mlx)",
    }
    rows = []
    for key in ("make_test", "tier1", "tier2", "tier3"):
        name, label, budget = f"tiers.{key}_s", labels[key], f"{BUDGETS_S[key]:g}"
        goal = Goal("<=", BUDGETS_S[key], f"≤ {budget} s")
        if key in live:
            r = live[key]
            detail = f"measured live: {r['summary'] or 'exit ' + str(r['exit_code'])}"
            fig = s.add(Figure(name, label, r["seconds"], "s", goal, detail=detail))
            if r["exit_code"] not in (0, 5):
                fig.reason = (
                    f"the tests did not all pass (exit {r['exit_code']}: {r['summary']}); time still counted"
                )
            rows.append([label, f"{r['seconds']:.1f}", budget, "live", r["summary"]])
            continue
        rec = recorded.get(key)
        if rec is None or rec.get("seconds") is None:
            reason = "no recorded report; run it, or `python -m bench.run --tiers`"
            s.add(Figure(name, label, None, "s", goal, reason=reason))
            rows.append([label, "—", budget, "not recorded", ""])
            continue
        seconds, status, when = float(rec["seconds"]), rec.get("status"), rec["recorded"]
        valid = status == "passed"
        value = seconds if valid else None
        detail = f"from {rec['source']} ({status}, model {rec.get('model')})"
        reason = (
            ""
            if valid
            else f"the latest recorded run did not pass ({status}, {seconds:.0f} s): not a valid tier time"
        )
        s.add(Figure(name, label, value, "s", goal, detail=detail, reason=reason, recorded=when))
        if key in SPEED_GOALS_S:
            speed = Goal("<=", SPEED_GOALS_S[key], f"≤ {SPEED_GOALS_S[key]:g} s")
            detail = f"report seconds of {rec['source']}, warm model cache"
            speed_label = f"{label}: the run itself (speed goal)"
            s.add(
                Figure(f"tiers.{key}_speed_s", speed_label, value, "s", speed, detail=detail, recorded=when)
            )
        rows.append([label, f"{seconds:.1f}", budget, f"recorded {when}", f"{status}, {rec.get('model')}"])
    s.table(["tier", "seconds", "budget s", "how", "result"], rows)
    s.notes.append(
        "Tier times include pytest start-up. Tiers 2 and 3 are not rerun by default (together they "
        "would take most of the 15-minute bench budget): their figures come from the latest recorded "
        "report, with its date. `python -m bench.run --tiers` runs them live."
    )
    s.data = {"live": live, "recorded": recorded, "budgets_s": BUDGETS_S}
    return s


def run_section(artifacts: Path, *, live_slow: bool = False, quick: bool = False, log=print) -> Section:
    live = {}
    if not quick:
        live["make_test"] = run_pytest(MAKE_TEST)
        log(f"  make test: {live['make_test']['seconds']:.1f} s ({live['make_test']['summary']})")
    live["tier1"] = run_pytest(TIER1)
    log(f"  tier 1: {live['tier1']['seconds']:.1f} s ({live['tier1']['summary']})")
    if live_slow:
        live["tier2"] = run_pytest(TIER2, {"FT_REAL_MODEL_ENABLE": "1"})
        log(f"  tier 2: {live['tier2']['seconds']:.1f} s")
        if (ROOT / TIER3[0]).exists():
            live["tier3"] = run_pytest(TIER3, {"FT_E2E_MLX_ENABLE": "1"})
            log(f"  tier 3: {live['tier3']['seconds']:.1f} s")
    recorded = {"tier2": recorded_tier2(artifacts), "tier3": recorded_tier3(artifacts)}
    s = summarize(live, recorded)
    stage_figures(s, artifacts)
    return s
