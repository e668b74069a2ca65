"""RUN/report.html: one self-contained page a person can read, made from report.json and the run's files.

Everything is inline (CSS; the loss curve and the stage timeline as PNG data URIs drawn with matplotlib's
Agg canvas): the page opens from a CI artifact or a mail attachment with nothing else around it. Every text
from the report or the run is escaped. A section whose source is missing (`finetune train` has no gates, a
failed run may lack metrics) says so instead of failing.
"""

from __future__ import annotations

import html
import json
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from finetune.gates.registry import LOWER_IS_BETTER
from finetune.report.forms import HEADERS, form_rows
from finetune.report.models import RunReport
from finetune.report.plots import loss_plot, timeline_plot
from finetune.system.atomic import atomic_write_text
from finetune.train.metrics import METRICS, read_metrics

HTML_NAME = "report.html"
MAX_ANSWERS = 24  # probe rows shown; tier 3 evaluates 24 prompts
STATUS_CLASS = {
    "passed": "ok",
    "not_judged": "muted",
    "skipped": "muted",
    "failed": "bad",
    "bad_input": "bad",
    "degraded": "warn",
    "interrupted": "warn",
    "running": "warn",
    "fault_injected": "bad",
}
CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1150px;
 color:#212121;padding:0 16px}
h1{font-size:24px;margin:0 0 6px}h2{font-size:18px;margin:28px 0 8px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;width:100%;margin:6px 0}th,td{border:1px solid #e0e0e0;padding:4px 8px;
 text-align:left;vertical-align:top}th{background:#f5f5f5}td.num{text-align:right;font-variant-numeric:tabular-nums}
.badge{display:inline-block;padding:1px 8px;border-radius:10px;color:#fff;font-weight:600;font-size:12px}
.ok{background:#2e7d32}.bad{background:#c62828}.warn{background:#ef6c00}.muted{background:#757575}
.missing{color:#757575;font-style:italic}img{max-width:100%}pre{white-space:pre-wrap;margin:0;font:12px monospace}
.meta td:first-child{width:170px;color:#555}.small{font-size:12px;color:#555}
"""


def _e(value: Any) -> str:
    return html.escape("-" if value is None else str(value))


def _num(x: Any) -> str:
    return "-" if not isinstance(x, int | float) else f"{x:.4g}"


def _badge(status: str) -> str:
    return f'<span class="badge {STATUS_CLASS.get(status, "muted")}">{_e(status.upper())}</span>'


def _table(headers: Sequence[str], rows: Iterable[Sequence[str]], cls: str = "") -> str:
    """Cells are HTML already (escaped by the caller); headers are plain text."""
    head = "".join(f"<th>{_e(h)}</th>" for h in headers)
    body = "".join("<tr>" + "".join(f"<td>{c}</td>" for c in row) + "</tr>" for row in rows)
    return f'<table class="{cls}"><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>'


def _missing(text: str) -> str:
    return f'<p class="missing">{_e(text)}</p>'


def _plot(draw: Any, *args: Any) -> str:
    try:
        return f'<img alt="plot" src="{draw(*args)}">'
    except Exception as exc:  # no matplotlib, or odd data: the page still carries every table
        return _missing(f"plot unavailable: {type(exc).__name__}: {exc}")


def _gate(report: RunReport, name: str) -> Any:
    return next((g for g in report.gates if g.name == name), None)


def _stage(report: RunReport, name: str) -> Any:
    return next((s for s in report.stages if s.name == name), None)


# ---------------------------------------------------------------- sections


def _header(report: RunReport) -> str:
    title = f"FineTune {report.command}: {report.status.upper()} (exit {report.exit_code})"
    meta = [
        ("profile", report.profile),
        ("model", report.model),
        ("run directory", report.run_dir),
        ("started / finished", f"{report.started_at} / {report.finished_at}"),
        ("wall time", f"{report.seconds:.1f} s"),
        ("code version", report.code_version),
    ]
    if report.model_license:
        meta.insert(2, ("model license", report.model_license))
    if report.faults:
        meta.append(("injected faults", ", ".join(report.faults)))
    if report.resume_command:
        meta.append(("resume with", report.resume_command))
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(v)}</td></tr>" for k, v in meta)
    out = f"<h1>{_e(title)} {_badge(report.status)}</h1><table class='meta'>{rows}</table>"
    if report.reasons:
        out += "<h2>Why not passed</h2><ul>" + "".join(f"<li>{_e(r)}</li>" for r in report.reasons) + "</ul>"
    if report.allowed_skips:
        items = "".join(f"<li>{_e(a)}</li>" for a in report.allowed_skips)
        out += f"<h2>Allowed skips</h2><ul>{items}</ul>"
    return out


def _loss(report: RunReport, run_dir: Path) -> str:
    out = "<h2>Loss curve</h2>"
    rows = read_metrics(run_dir / METRICS)
    train = sorted(
        (r["step"], r["train_loss"]) for r in rows if r.get("kind") == "train" and "train_loss" in r
    )
    val = sorted((r["step"], r["val_loss"]) for r in rows if r.get("kind") == "val" and "val_loss" in r)
    details = (_stage(report, "train").details if _stage(report, "train") else {}) or {}
    facts = [f"{_num(details['steps'])} steps"] if "steps" in details else []
    if isinstance(details.get("wall_time_s"), int | float):
        facts.append(f"training took {details['wall_time_s']:.1f} s")
    if isinstance(details.get("peak_memory_bytes"), int | float):
        facts.append(f"peak memory: {details['peak_memory_bytes'] / 2**20:.0f} MiB")
    if val:
        step, best = min(val, key=lambda sv: sv[1])
        facts.append(f"best validation loss {best:.4g} at step {step}")
    if train:
        facts.append(f"train loss {train[0][1]:.4g} -> {train[-1][1]:.4g}")
    out += f'<p class="small">{_e("; ".join(facts))}</p>' if facts else ""
    if not (train or val):
        return out + _missing(
            f"no training metrics in {run_dir / METRICS} (training did not run or the file is gone)"
        )
    return out + _plot(loss_plot, train, val)


def _gates(report: RunReport) -> str:
    out = "<h2>Gates</h2>"
    if not report.gates:
        return out + _missing(f"no gate ran in this command ({report.command}: status {report.status})")
    rows = []
    for g in report.gates:
        cmp = "≤" if g.name in LOWER_IS_BETTER else "≥"
        if g.threshold is None or g.measured is None:
            versus = _num(g.measured) + ("" if g.threshold is None else f" (threshold {_num(g.threshold)})")
        else:
            versus = f"{_num(g.measured)} {cmp} {_num(g.threshold)}"
        rows.append(
            [f"<b>{_e(g.name)}</b>", _badge(g.status), _e(versus), _e(g.why), f"<pre>{_e(g.detail)}</pre>"]
        )
    return out + _table(["gate", "status", "measured vs threshold", "why it exists", "detail"], rows)


def _parity(report: RunReport) -> str:
    out = "<h2>Runtime parity</h2>"
    if not report.scores:
        why = "only tier 3 (`finetune pipeline`) evaluates runtimes, and a failed run may have stopped before"
        return out + _missing(f"no runtime scores: {why}")
    parity, effect = _gate(report, "output_parity"), _gate(report, "adapter_effect")
    rates = parity.data.get("rates", {}) if parity else {}
    reference = parity.data.get("reference") if parity else None
    effects = effect.data.get("runtimes", {}) if effect else {}
    rows = []
    for sc in report.scores:
        rate = rates.get(sc.runtime) or {}
        agree = ", ".join(f"{k} {v:.0%}" for k, v in rate.items()) or (
            "reference" if sc.runtime == reference else "-"
        )
        changed = (effects.get(sc.runtime) or {}).get("changed")
        changed_text = "-" if changed is None else f"{changed:.0%}"
        scores = [_split_score(sc.train), _split_score(sc.heldout)]
        rows.append([_e(text) for text in (sc.runtime, *scores, agree, changed_text)])
    agreement = f"agreement with {reference or 'reference'}"
    headers = ["runtime", "train (contains reference)", "held-out", agreement, "answers changed vs base"]
    out += _table(headers, rows)
    if report.ollama:
        o = report.ollama
        checks = [*o.deploy_checks, *o.served_checks]
        out += f"<p>Ollama {_badge(o.status)} {_e(o.version)} model {_e(o.model)} {_e(o.reason or '')}</p>"
        if checks:
            out += _table(
                ["check", "passed", "detail"], [[_e(c.name), _e(c.passed), _e(c.detail)] for c in checks]
            )
    return out


def _forms(report: RunReport) -> str:
    rows = form_rows(report)
    if not rows:
        return ""
    cells = [[_e(c) if i != len(row) - 1 else _badge(c) for i, c in enumerate(row)] for row in rows]
    return "<h2>Shipped forms</h2>" + _table(HEADERS, cells)


def _split_score(split: Any) -> str:
    return f"{split.contains}/{split.n} ({split.score:.0%}), exact {split.exact}"


def _stages(report: RunReport) -> str:
    out = "<h2>Stage timeline</h2>"
    if not report.stages:
        return out + _missing("no stage ran")
    bars = [
        {"name": s.name, "seconds": s.seconds, "cached": s.cached, "status": s.status} for s in report.stages
    ]
    out += _plot(timeline_plot, bars)
    rows = []
    for s in report.stages:
        files = "<br>".join(_artifact(a) for a in s.artifacts) or '<span class="missing">-</span>'
        seconds = f'<span class="num">{s.seconds:.2f} s</span>'
        cached, required = _e("cached" if s.cached else ""), _e("" if s.required else "optional")
        rows.append([_e(s.name), _badge(s.status), seconds, cached, required, _e(s.reason or ""), files])
    return out + _table(["stage", "status", "seconds", "cached", "required", "reason", "artifacts"], rows)


def _artifact(a: Any) -> str:
    gone = "" if Path(a.path).exists() else " <b>missing now</b>"
    return f"{_e(a.name)}: {_e(a.path)} ({a.bytes} B, {_e(a.sha256[:12])}){gone}"


def _answers(report: RunReport, run_dir: Path) -> str:
    out = "<h2>Base vs tuned answers (probe questions)</h2>"
    learning = _gate(report, "model_learning")
    cases = learning.data.get("cases") if learning else None
    if cases:
        rows = [_learning_case(c) for c in cases[:MAX_ANSWERS]]
        out += '<p class="small">From the model_learning verdict: base model vs base + saved adapter.</p>'
        return out + _table(["reference", "base answer", "score", "tuned answer", "score"], rows)
    try:
        results = json.loads((run_dir / "eval" / "results.json").read_text(encoding="utf-8"))
        prompts, answers = results["prompts"], results["answers"]
    except (OSError, ValueError, KeyError, TypeError):
        return out + _missing("no probe answers: no model_learning verdict and no eval/results.json")
    tuned = [r for r in ("mlx_adapter", "ollama") if r in answers]
    if "mlx_base" not in answers or not tuned:
        return out + _missing(f"eval/results.json has answers of {sorted(answers)}: no base/tuned pair")
    rows = []
    for i, p in enumerate(prompts[:MAX_ANSWERS]):
        texts = [(answers[r][i].get("text") if i < len(answers[r]) else None) for r in ("mlx_base", *tuned)]
        answers_shown = [f"<pre>{_e(t)}</pre>" for t in texts]
        rows.append([_e(p.get("kind")), _e(p.get("question")), _e(p.get("reference")), *answers_shown])
    out += '<p class="small">From eval/results.json: greedy answers of each runtime.</p>'
    return out + _table(["split", "question", "reference", "mlx_base", *tuned], rows)


def _learning_case(c: dict[str, Any]) -> list[str]:
    before, after = f"<pre>{_e(c.get('before'))}</pre>", f"<pre>{_e(c.get('after'))}</pre>"
    return [_e(c.get("reference")), before, _e(c.get("before_score")), after, _e(c.get("after_score"))]


def _environment(report: RunReport) -> str:
    env = report.environment or {}
    mlx, blas = env.get("mlx") or {}, env.get("blas") or {}
    matmul, memory = blas.get("matmul") or {}, env.get("memory") or {}
    known = {
        "python": env.get("python"),
        "platform": env.get("platform"),
        "machine": env.get("machine"),
        "cpus": env.get("cpu_count"),
        "mlx": mlx and f"{mlx.get('version')} on {mlx.get('default_device')} ({mlx.get('backend')})",
        "blas": blas and f"{blas.get('active')} ({blas.get('library') or '-'}): {blas.get('detail') or ''}",
        "matmul GFLOP/s": matmul and f"MLX {matmul.get('mlx_gflops')} vs numpy {matmul.get('numpy_gflops')}",
        "packages": ", ".join(f"{k} {v}" for k, v in (env.get("packages") or {}).items() if v),
        "memory": memory.get("total_bytes") and f"{memory['total_bytes'] / 2**30:.1f} GiB total",
    }
    shown = {"python", "platform", "machine", "cpu_count", "mlx", "blas", "packages", "memory"}
    rows = [[_e(k), _e(v)] for k, v in known.items() if v]
    # whatever else the report recorded (thread variables, disk; a test's stand-in environment)
    rows += [
        [_e(k), f"<pre>{_e(json.dumps(v, default=str))}</pre>"] for k, v in env.items() if k not in shown
    ]
    out = "<h2>Environment</h2>"
    return out + (_table(["what", "value"], rows, "meta") if rows else _missing("no environment recorded"))


def render_html(report: RunReport, run_dir: str | Path | None = None) -> str:
    """The whole page as text; `run_dir` (default report.run_dir) is where metrics and eval results are read."""
    run_dir = Path(run_dir if run_dir is not None else report.run_dir)
    sections = [
        _header(report),
        _loss(report, run_dir),
        _gates(report),
        _parity(report),
        _forms(report),
        _stages(report),
        _answers(report, run_dir),
        _environment(report),
    ]
    title = f"FineTune {report.command} {report.status} - {Path(report.run_dir).name}"
    head = (
        f'<meta charset="utf-8"><title>{_e(title)}</title>'
        f'<meta name="viewport" content="width=device-width, initial-scale=1"><style>{CSS}</style>'
    )
    body = "".join(sections)
    return f'<!DOCTYPE html><html lang="en"><head>{head}</head><body>{body}</body></html>\n'


def write_html(report: RunReport, run_dir: str | Path | None = None) -> Path:
    """Write RUN/report.html (atomically) next to report.json and return its path."""
    run_dir = Path(run_dir if run_dir is not None else report.run_dir)
    return atomic_write_text(run_dir / HTML_NAME, render_html(report, run_dir))
