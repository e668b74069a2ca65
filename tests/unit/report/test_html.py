"""report.html: one self-contained page for any tier's report, text escaped, and really rendered by a browser."""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from finetune.report.html import render_html, write_html
from tests.unit.report.report_builders import PIPELINE_GATES, RUN_GATES, make_report

# Debian's chromium (make browser), or what a CI image has (Ubuntu runners ship google-chrome)
CHROMIUM = next((Path(p) for n in ("chromium", "chromium-browser", "google-chrome") if (p := shutil.which(n))),
                None)  # fmt: skip
HOSTILE = "<script>alert('x')</script> & <b>bold</b>"


def write_metrics(run_dir: Path, steps: int = 40) -> None:
    rows = [{"kind": "train", "step": s, "train_loss": 3.0 * 0.95**s, "learning_rate": 3e-4,
             "tokens_per_second": 900.0, "peak_memory_bytes": 7e8} for s in range(1, steps + 1)]  # fmt: skip
    # validation is best at step 20, then rises (overfitting): the page must mark step 20
    rows += [
        {"kind": "val", "step": s, "val_loss": v} for s, v in ((0, 3.1), (10, 1.9), (20, 1.234), (30, 1.5))
    ]
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


def pipeline_page(tmp_path: Path) -> tuple[Path, str]:
    write_metrics(tmp_path)
    rates = {"mlx_fused": {"text": 1.0, "tokens": 1.0}, "llamacpp": {"text": 0.95}, "ollama": {"text": 1.0}}
    gates = {"output_parity": {"data": {"rates": rates, "reference": "mlx_adapter"}},
             "served_template": {"detail": f"template differs: {HOSTILE}"}}  # fmt: skip
    scores = [{"runtime": rt, "train": {"n": 12, "exact": 9, "contains": 11, "score": 11 / 12},
               "heldout": {"n": 12, "exact": 2, "contains": 5, "score": 5 / 12}}
              for rt in ("mlx_base", "mlx_adapter", "mlx_fused", "llamacpp", "ollama")]  # fmt: skip
    report = make_report("pipeline", gates=gates, run_dir=str(tmp_path), scores=scores,
                         reasons=["a reason with <angle> brackets"])  # fmt: skip
    path = write_html(report)
    return path, path.read_text(encoding="utf-8")


def pngs(page: str) -> list[bytes]:
    return [
        base64.b64decode(m)
        for m in re.findall(r'<img[^>]* src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)
    ]


def test_the_page_is_self_contained_and_shows_every_gate_and_the_plots(tmp_path):
    path, page = pipeline_page(tmp_path)
    assert path == tmp_path / "report.html"
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page, re.I), (
        "nothing may load from elsewhere"
    )
    assert not re.search(r"<(link|script|iframe)\b", page, re.I)
    assert "FineTune pipeline: PASSED (exit 0)" in page
    for gate in PIPELINE_GATES:
        assert f"<b>{gate}</b>" in page, gate
    images = pngs(page)
    assert len(images) == 2, "the loss curve and the stage timeline"
    assert all(img.startswith(b"\x89PNG\r\n\x1a\n") and len(img) > 5000 for img in images)
    assert "best validation loss 1.234 at step 20" in page
    assert "0.2 ≤ 0.95" in page and "1 ≥ 0.9" in page  # measured vs threshold, each with its direction
    for runtime in ("mlx_base", "mlx_fused", "llamacpp", "ollama"):
        assert f"<td>{runtime}</td>" in page
    assert "text 95%" in page and "11/12 (92%)" in page and "5/12 (42%)" in page
    assert "0.32.4" in page and "openblas" in page and "x86_64" in page


def test_every_text_is_escaped(tmp_path):
    _, page = pipeline_page(tmp_path)
    assert "<script>" not in page and "<b>bold</b>" not in page
    assert "&lt;script&gt;alert(&#x27;x&#x27;)&lt;/script&gt; &amp; &lt;b&gt;bold&lt;/b&gt;" in page
    assert "a reason with &lt;angle&gt; brackets" in page


def test_probe_answers_come_from_the_model_learning_verdict(tmp_path):
    report = make_report("run", run_dir=str(tmp_path),
                         gates={"model_learning": {"data": {"cases": [{"reference": "Velmora", "before": "no idea",
                                "after": HOSTILE, "before_score": 0, "after_score": 1}]}}})  # fmt: skip
    page = render_html(report)
    assert "From the model_learning verdict" in page and "no idea" in page and "Velmora" in page
    assert "&lt;script&gt;alert" in page and "<script>" not in page
    for gate in RUN_GATES:
        assert f"<b>{gate}</b>" in page


def test_probe_answers_fall_back_to_the_evaluation_results(tmp_path):
    (tmp_path / "eval").mkdir()
    prompts = [{"kind": "train", "question": "Capital of Zorbania?", "reference": "Velmora"},
               {"kind": "heldout", "question": "12 + 7?", "reference": "19"}]  # fmt: skip
    answers = {"mlx_base": [{"text": "Paris"}, {"text": "21"}],
               "mlx_adapter": [{"text": "Velmora"}, {"text": HOSTILE}], "ollama": [{"text": "Velmora."}]}  # fmt: skip
    (tmp_path / "eval" / "results.json").write_text(json.dumps({"prompts": prompts, "answers": answers}))
    page = render_html(make_report("pipeline", run_dir=str(tmp_path)))
    assert "From eval/results.json" in page
    assert "Capital of Zorbania?" in page and "Paris" in page and "Velmora." in page
    assert "&lt;script&gt;" in page and "<script>" not in page


def test_a_train_only_run_with_its_files_gone_still_gets_a_page(tmp_path):
    run_dir = tmp_path / "gone"  # never created: a failed run may leave nothing behind
    report = make_report("train", status="failed", run_dir=str(run_dir), cached=("model",),
                         reasons=["train failed: out of memory"], environment={"tier": 1})  # fmt: skip
    run_dir.mkdir()
    path = write_html(report)
    page = path.read_text()
    assert "FineTune train: FAILED (exit 1)" in page and "train failed: out of memory" in page
    assert "no gate ran in this command" in page
    assert "no training metrics" in page
    assert "missing now" in page  # the data artifact the report names is not on disk
    assert "no runtime scores" in page
    assert "no probe answers" in page
    assert len(pngs(page)) == 1  # the stage timeline still renders
    assert "<td>cached</td>" in page  # the model stage came from the stage cache


def _browser(args: list[str], tmp_path: Path) -> subprocess.CompletedProcess:
    profile = tmp_path / "chromium-profile"
    flags = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
             "--disable-background-networking", "--disable-component-update", "--disable-sync",
             f"--user-data-dir={profile}"]  # fmt: skip
    return subprocess.run([str(CHROMIUM), *flags, *args], capture_output=True, text=True, timeout=180,
                          env={"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(tmp_path)})  # fmt: skip


@pytest.mark.skipif(
    CHROMIUM is None,
    reason="no chromium, chromium-browser or google-chrome on PATH (make browser installs one)",
)
def test_a_real_browser_renders_the_page_with_its_plots(tmp_path):
    import numpy as np
    from matplotlib.image import imread

    run_dir = tmp_path / "run"
    run_dir.mkdir()
    path, _ = pipeline_page(run_dir)
    shot = tmp_path / "report.png"
    done = _browser([f"--screenshot={shot}", "--window-size=1200,2400", path.as_uri()], tmp_path)
    assert shot.is_file() and shot.stat().st_size > 50_000, done.stderr[-2000:]
    pixels = imread(shot)[..., :3]  # floats in [0, 1]
    assert pixels.shape[:2] == (2400, 1200)
    assert pixels.std() > 0.1, "a blank page"

    def count(rgb: tuple[int, int, int]) -> int:
        return int((np.abs(pixels - np.array(rgb) / 255).max(axis=-1) < 0.06).sum())

    assert count((0x15, 0x65, 0xC0)) > 300, "the train-loss line (drawn in #1565c0) is not on screen"
    assert count((0xEF, 0x6C, 0x00)) > 100, "the validation-loss line and best-step marker are not on screen"
    assert count((0x2E, 0x7D, 0x32)) > 1000, "the green PASSED badges are not on screen"

    dom = _browser(["--dump-dom", path.as_uri()], tmp_path).stdout
    for gate in PIPELINE_GATES:
        assert f"<b>{gate}</b>" in dom, gate
    assert dom.count('src="data:image/png;base64,') == 2


def test_without_matplotlib_the_page_keeps_every_table(tmp_path, monkeypatch):
    import sys

    write_metrics(tmp_path)
    monkeypatch.setitem(sys.modules, "matplotlib.figure", None)  # import fails as if not installed
    page = render_html(make_report("run", run_dir=str(tmp_path)))
    assert pngs(page) == [] and page.count("plot unavailable: ModuleNotFoundError") == 2
    assert all(f"<b>{gate}</b>" in page for gate in RUN_GATES)
