"""The report page's plots as PNG data URIs: the loss curve and the stage timeline.

matplotlib's Agg canvas, no pyplot: figures are built directly, so drawing never touches a global backend or a
display; matplotlib is imported inside each function, so a machine without it still gets the page (the
caller shows "plot unavailable" instead).
"""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

STATUS_COLOURS = {"passed": "#2e7d32", "failed": "#c62828", "skipped": "#9e9e9e"}
CACHED_COLOUR = "#90caf9"


def _data_uri(fig: Any) -> str:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100, bbox_inches="tight", metadata={"Software": None})
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def loss_plot(train: Sequence[tuple[int, float]], val: Sequence[tuple[int, float]]) -> str:
    """Training loss per step and validation loss per evaluation, the best validation step marked."""
    from matplotlib.figure import Figure

    fig = Figure(figsize=(11, 3.8))
    ax = fig.add_subplot()
    if train:
        ax.plot([s for s, _ in train], [v for _, v in train], color="#1565c0", lw=1.2, label="train loss")
    if val:
        steps, losses = [s for s, _ in val], [v for _, v in val]
        ax.plot(steps, losses, "o-", color="#ef6c00", lw=1.5, ms=5, label="validation loss")
        best = min(range(len(losses)), key=losses.__getitem__)
        ax.axvline(steps[best], color="#ef6c00", ls=":", lw=1)
        best_point = (steps[best], losses[best])
        note = f"best val {losses[best]:.4g} @ step {steps[best]}"
        ax.annotate(
            note, best_point, xytext=(10, -18), textcoords="offset points", color="#e65100", fontsize=9
        )
        ax.plot([steps[best]], [losses[best]], "*", color="#e65100", ms=14, label="best validation step")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper right", fontsize=9)
    return _data_uri(fig)


def timeline_plot(stages: Sequence[dict[str, Any]]) -> str:
    """One horizontal bar per stage, placed end to end in run order; cached stages hatched and labelled."""
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch

    fig = Figure(figsize=(11, 0.4 * len(stages) + 1.2))
    ax = fig.add_subplot()
    total = sum(s["seconds"] for s in stages) or 1.0
    start = 0.0
    for i, s in enumerate(stages):
        width = max(s["seconds"], total * 0.004)  # a 0 s (cached or skipped) stage still shows a sliver
        colour = CACHED_COLOUR if s["cached"] else STATUS_COLOURS.get(s["status"], "#757575")
        ax.barh(i, width, left=start, color=colour, hatch="//" if s["cached"] else None, edgecolor="#424242")
        label = f"{s['seconds']:.{1 if s['seconds'] >= 1 else 2}f} s" + (" (cached)" if s["cached"] else "")
        label += "" if s["status"] == "passed" else f" {s['status'].upper()}"
        ax.text(start + width + total * 0.01, i, label, va="center", fontsize=9)
        start += s["seconds"]
    ax.set_yticks(range(len(stages)), [s["name"] for s in stages])
    ax.invert_yaxis()
    ax.set_xlim(0, total * 1.3)
    ax.set_xlabel("seconds since the run started")
    ax.grid(axis="x", alpha=0.3)
    handles = [Patch(color=c, label=n) for n, c in STATUS_COLOURS.items()]
    handles.append(Patch(facecolor=CACHED_COLOUR, hatch="//", edgecolor="#424242", label="cached"))
    ax.legend(handles=handles, loc="upper right", fontsize=8, ncols=2)  # bars run down to the right
    return _data_uri(fig)
