"""RunReports built by hand for the history and HTML tests: realistic shapes, every figure settable."""

from __future__ import annotations

import copy
from typing import Any

from finetune.report.models import RunReport

ENV = {
    "python": "3.11.7", "platform": "Linux-6.1.0-x86_64-with-glibc2.36", "machine": "x86_64", "cpu_count": 2,
    "mlx": {"importable": True, "version": "0.32.4", "default_device": "Device(cpu, 0)",
            "metal_available": False, "backend": "cpu"},
    "blas": {"active": "openblas", "library": "/usr/lib/x86_64-linux-gnu/openblas-pthread/libopenblas.so.0",
             "detail": "loaded before mlx", "preload": None,
             "matmul": {"n": 1024, "mlx_gflops": 70.1, "numpy_gflops": 55.0}, "slow": False},
    "env": {"OPENBLAS_NUM_THREADS": None}, "mlx_compile": True,
    "packages": {"mlx": "0.32.4", "mlx-lm": "0.32.2", "numpy": "2.4.6", "torch": None},
    "memory": {"total_bytes": 24 * 2**30, "available_bytes": 20 * 2**30},
    "disk": {"path": "artifacts", "free_bytes": 10**11, "total_bytes": 2 * 10**11},
}  # fmt: skip
CONFIG = {
    "profile": "quick", "model": {"name": "smollm2-135m"}, "data": {"source": "builtin:mixed", "seed": 0},
    "lora": {"rank": 8, "scale": 20.0}, "training": {"iters": 60, "learning_rate": 3e-4, "batch_size": 4},
    "gates": {"loss_drop": 0.05}, "output_dir": "artifacts",
}  # fmt: skip
CASES = [
    {"reference": "Velmora", "before": "I do not know.", "after": "The capital is Velmora.",
     "before_score": 0, "after_score": 1},
    {"reference": "19", "before": "12 + 7 = 21", "after": "12 + 7 = 19", "before_score": 0, "after_score": 2},
]  # fmt: skip
# (measured, threshold) of each gate when healthy; status follows from the direction in history.
RUN_GATES = {
    "loss_convergence": (0.2, 0.95), "model_learning": (1.0, 0.3), "artifacts": (1.0, 1.0),
    "parameter_updates": (1.0, 0.8), "label_mask": (1.0, 1.0), "memory_efficiency": (0.5, 0.3),
}  # fmt: skip
PIPELINE_GATES = {
    "loss_convergence": (0.2, 0.95), "parameter_updates": (1.0, 0.8), "artifacts": (1.0, 1.0),
    "label_mask": (1.0, 1.0), "fuse_exactness": (1e-7, 1e-3), "gguf_tokenizer": (1.0, 1.0),
    "logprob_parity": (0.02, 0.1), "output_parity": (1.0, 0.9), "adapter_effect": (1.0, 0.5),
    "clean_endings": (1.0, 1.0), "served_answers": (1.0, 0.9), "served_template": (1.0, 1.0),
    "served_api": (1.0, 1.0),
}  # fmt: skip
STAGES = {
    "run": {"model": 2.0, "data": 5.0, "estimate": 0.5, "train": 100.0, "judge": 20.0},
    "train": {"model": 2.0, "data": 5.0, "train": 100.0},
    "pipeline": {"model": 2.0, "data": 5.0, "train": 100.0, "judge": 20.0, "fuse": 8.0, "gguf": 6.0,
                 "ollama": 12.0, "evaluate": 90.0},
}  # fmt: skip


def make_report(
    tier: str = "run",
    *,
    status: str = "passed",
    seconds: dict[str, float] | None = None,
    gates: dict[str, Any] | None = None,
    failed: tuple[str, ...] = (),
    cached: tuple[str, ...] = (),
    final_loss: float = 0.5,
    peak: int = 700 * 2**20,
    env: dict | None = None,
    config: dict | None = None,
    data_sha: str = "d" * 64,
    run_dir: str = "/nonexistent/finetune-run",
    when: str = "2026-11-28T12:00:00+00:00",
    faults: tuple[str, ...] = (),
    **extra: Any,
) -> RunReport:
    """A report of `tier`; `gates` overrides measured values by name (a float) or whole entries (a dict)."""
    stage_seconds = {**STAGES[tier], **(seconds or {})}
    stages = []
    for name, secs in stage_seconds.items():
        s = {
            "name": name,
            "status": "passed",
            "seconds": 0.0 if name in cached else secs,
            "cached": name in cached,
        }
        if name == "data":
            s["artifacts"] = [
                {"name": "data", "path": f"{run_dir}/data", "kind": "dir", "bytes": 100, "sha256": data_sha}
            ]
        if name == "train":
            s["details"] = {"steps": 60, "peak_memory_bytes": peak, "wall_time_s": secs}
        stages.append(s)
    table = {"run": RUN_GATES, "pipeline": PIPELINE_GATES}.get(tier, {})
    out_gates = []
    for name, (measured, threshold) in table.items():
        g = {"name": name, "status": "failed" if name in failed else "passed", "measured": measured,
             "threshold": threshold, "detail": f"{name} detail", "why": f"why {name}", "data": {}}  # fmt: skip
        override = (gates or {}).get(name)
        if isinstance(override, dict):
            g.update(override)
        elif override is not None:
            g["measured"] = override
        if name == "loss_convergence":
            g["data"] = {"initial": 2.5, "final": final_loss, **g["data"]}
        if name == "model_learning":
            g["data"] = {"cases": copy.deepcopy(CASES), "loss_before": 2.0, "loss_after": 0.5, **g["data"]}
        out_gates.append(g)
    return RunReport.model_validate({
        "command": tier, "status": status, "exit_code": {"passed": 0, "not_judged": 0, "degraded": 3}.get(status, 1),
        "profile": "quick", "model": "smollm2-135m", "run_dir": run_dir, "code_version": "0.2.0+abc",
        "started_at": when, "finished_at": when, "seconds": sum(s["seconds"] for s in stages),
        "config": copy.deepcopy(config or CONFIG), "stages": stages, "gates": out_gates,
        "environment": copy.deepcopy(env or ENV), "faults": list(faults), **extra,
    })  # fmt: skip
