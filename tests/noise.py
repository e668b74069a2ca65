"""Numeric tolerances as k x a noise floor measured in the same test, on the same machine.

A constant tolerance measures the CPU it was tuned on: the shortcut tests allowed 1e-4 and another EPYC
measured 4.4e-4, while the plain path itself sat 4.2e-4 from a float64 run of the same maths. So each
comparison here measures its floor first (the plain computation's own rounding: its float32 result against
the same computation in float64, or under another harmless reassociation) and asserts error <= k x floor,
with k stated where it is used. `make test-portability` collects every (error, floor, k) it asserts into
docs/portability.md (FT_FLOOR_LOG names the JSON-lines file), per BLAS kernel.
"""

from __future__ import annotations

import contextlib
import json
import os
import time

import numpy as np

# A floor is never below a few float32 ulps of the compared scale: a reassociation that happens to round
# identically (MLX's reference BLAS sums in one fixed order) measures 0, and 0 cannot be scaled.
F32_ULPS = 4 * float(np.finfo(np.float32).eps)


def rel_max(a, b) -> float:
    """max |a - b| / max |b| (float64, so the comparison adds no rounding of its own)."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / max(np.abs(b).max(), 1e-30))


def rel_fro(a, b) -> float:
    """||a - b|| / ||b||, Frobenius."""
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))


def measure(name: str, err: float, floor: float, k: float, *, min_floor: float = F32_ULPS) -> str | None:
    """Judge err <= k x max(floor, min_floor) and record the figures for docs/portability.md; the failure as
    text, or None."""
    used = max(floor, min_floor)
    ok = err <= k * used
    print(
        f"{name}: error {err:.3g} <= {k:g} x floor {used:.3g} ({err / used:.2f} floors): {'ok' if ok else 'FAIL'}"
    )
    if path := os.environ.get("FT_FLOOR_LOG"):
        row = {"test": os.environ.get("PYTEST_CURRENT_TEST", "").split(" ")[0], "check": name, "error": err,
               "floor": used, "k": k, "ratio": err / used, "ok": ok, "at": time.time()}  # fmt: skip
        with open(path, "a") as fh:  # one short line per write: concurrent xdist workers append whole lines
            fh.write(json.dumps(row) + "\n")
    return None if ok else f"{name}: error {err:.3g} > {k:g} x noise floor {used:.3g} (measured {floor:.3g})"


def within(name: str, err: float, floor: float, k: float, *, min_floor: float = F32_ULPS) -> None:
    """Assert err <= k x max(floor, min_floor) (and record it)."""
    failure = measure(name, err, floor, k, min_floor=min_floor)
    assert failure is None, failure


@contextlib.contextmanager
def as_float64(model):
    """The model in float64 inside the block (the noise-floor twin), back in its own dtypes after it: float32 ->
    float64 -> float32 is exact, so the model leaves as it came."""
    import mlx.core as mx
    from mlx.utils import tree_flatten, tree_unflatten

    before = tree_flatten(model.parameters())
    model.set_dtype(mx.float64)
    try:
        yield model
    finally:
        model.update(tree_unflatten([(k, v.astype(old.dtype)) for (k, v), (_, old) in
                                     zip(tree_flatten(model.parameters()), before, strict=True)]))  # fmt: skip
