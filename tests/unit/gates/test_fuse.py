"""The fuse-exactness gate on measurements (tests/unit/export/test_fuse_check.py measures real fuses)."""

from __future__ import annotations

from finetune.gates.fuse import FuseMeasurement, fuse_exactness

ADAPTED = {"model.layers.0.self_attn.q_proj": 2e-7, "model.layers.1.self_attn.v_proj": 5e-7}
DELTAS = {k: 0.05 for k in ADAPTED}


def test_base_plus_delta_and_untouched_tensors_pass():
    v = fuse_exactness(FuseMeasurement(dict(ADAPTED), DELTAS, [], [], untouched_total=10), max_rel=1e-3)
    assert v.passed and v.measured == 5e-7 and v.threshold == 1e-3
    assert v.data["worst"] == "model.layers.1.self_attn.v_proj"
    assert "2 adapted weights" in v.detail and "10/10 other tensors bitwise equal" in v.detail


def test_a_dropped_adapter_fails():
    # fused == base: the error equals the whole delta, a relative error of 1
    dropped = {k: 1.0 for k in ADAPTED}
    v = fuse_exactness(FuseMeasurement(dropped, DELTAS, [], [], untouched_total=10), max_rel=1e-3)
    assert not v.passed and v.measured == 1.0 and "2 adapted weights are not base + delta" in v.detail


def test_a_changed_untouched_tensor_fails():
    m = FuseMeasurement(dict(ADAPTED), DELTAS, ["model.norm.weight"], [], untouched_total=10)
    v = fuse_exactness(m, max_rel=1e-3)
    assert not v.passed and "1 untouched tensors changed (e.g. model.norm.weight)" in v.detail
    assert "9/10 other tensors" in v.detail and v.data["untouched_changed"] == ["model.norm.weight"]


def test_differing_tensor_sets_fail():
    m = FuseMeasurement(dict(ADAPTED), DELTAS, [], ["lm_head.weight"], untouched_total=10)
    v = fuse_exactness(m, max_rel=1e-3)
    assert not v.passed and "tensor sets differ" in v.detail and v.data["missing"] == ["lm_head.weight"]


def test_an_adapter_without_adapted_modules_fails():
    v = fuse_exactness(FuseMeasurement({}, {}, [], [], untouched_total=10), max_rel=1e-3)
    assert not v.passed and "no adapted module found" in v.detail


def test_the_threshold_is_a_strict_upper_bound():
    at = {"m": 1e-3}
    assert fuse_exactness(FuseMeasurement(at, {"m": 1.0}, []), max_rel=1e-3).passed
    assert not fuse_exactness(FuseMeasurement({"m": 1.1e-3}, {"m": 1.0}, []), max_rel=1e-3).passed
