"""finetune.report.plots: the loss curve and the stage timeline as self-contained PNG data URIs."""

from __future__ import annotations

import base64
import struct

from finetune.report.plots import loss_plot, timeline_plot

PREFIX = "data:image/png;base64,"


def png_size(uri: str) -> tuple[int, int]:
    assert uri.startswith(PREFIX)
    png = base64.b64decode(uri[len(PREFIX) :])
    assert png.startswith(b"\x89PNG\r\n\x1a\n") and png[12:16] == b"IHDR"
    return struct.unpack(">II", png[16:24])


def test_the_loss_curve_is_a_png_with_or_without_validation():
    train = [(s, 3.0 * 0.9**s) for s in range(1, 30)]
    val = [(0, 3.1), (10, 1.2), (20, 1.5)]
    width, height = png_size(loss_plot(train, val))
    assert width > 2 * height > 0  # 11 x 3.8 inches
    assert png_size(loss_plot(train, [])) and png_size(loss_plot([], val))


def test_the_timeline_grows_with_the_stages_and_shows_cached_and_zero_second_ones():
    stage = {"name": "train", "seconds": 12.0, "cached": False, "status": "passed"}
    few = [stage, {**stage, "name": "data", "seconds": 0.0, "cached": True}]
    many = few + [{**stage, "name": f"s{i}", "status": "failed"} for i in range(6)]
    _, few_height = png_size(timeline_plot(few))
    _, many_height = png_size(timeline_plot(many))
    assert many_height > few_height  # one bar per stage
    assert png_size(timeline_plot([{**stage, "seconds": 0.0}]))  # a run of 0 s still draws
