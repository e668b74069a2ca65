"""Tier 2: a real pretrained model is trained, and five quantified gates decide pass/fail.

Runs with FT_REAL_MODEL_ENABLE=1 (model: FT_TEST_MODEL, default smollm2-135m). Without the flag,
or when the model or memory is missing, it skips with the reason, printed and written to
artifacts/tier2-last.json. The verdicts land in the run directory as gates.json.
"""

from __future__ import annotations

import os
import time
from datetime import UTC, datetime
from pathlib import Path

import pytest

from finetune.atomic import atomic_write_json
from finetune.config import load_config, save_config

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = Path(os.environ.get("FT_ARTIFACTS", ROOT / "artifacts"))
MODEL = os.environ.get("FT_TEST_MODEL", "smollm2-135m")
N_QUESTIONS = 16  # training questions asked before and after: a 30% share is 5 answers, not a fluke

# Sized for a 2-core CPU within 5 minutes: a small fact set seen ~6 times, adapters on the top 8 blocks,
# plain ChatML (SmolLM2's own template adds a 30-token system prompt to every example).
TIER2 = [
    "data.source=builtin:mixed",
    "data.num_examples=40",
    "data.template=chatml",
    "lora.num_layers=8",
    "training.iters=48",
    "training.learning_rate=2e-4",
    "training.eval_every=16",
    "training.save_every=16",
]


def _skip(reason: str):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    atomic_write_json(ARTIFACTS / "tier2-last.json", {"tier": 2, "status": "skipped", "reason": reason,
                                                      "model": MODEL, "at": datetime.now(UTC).isoformat()})  # fmt: skip
    print(f"tier 2 SKIPPED: {reason}")
    pytest.skip(reason)


@pytest.fixture(scope="module")
def tier2():
    if os.environ.get("FT_REAL_MODEL_ENABLE") != "1":
        _skip("FT_REAL_MODEL_ENABLE is not 1 (tier 2 trains a real model for up to 5 minutes)")
    from finetune.models import ModelUnavailable, resolve_model
    from finetune.resources import available_memory_bytes, choose_for_memory

    choice = choose_for_memory(available_memory_bytes())
    if choice.model_spec is None:
        _skip(choice.reason)
    try:
        model_ref = resolve_model(MODEL)
    except ModelUnavailable as exc:
        _skip(f"model {MODEL!r} unavailable: {exc}")
    return run_tier2(model_ref, batch_size=choice.batch_size)


def run_tier2(model_ref, batch_size: int) -> dict:
    from mlx_lm import load

    from finetune import probe, validate
    from finetune.batches import load_split
    from finetune.memprobe import measure_in_subprocess
    from finetune.runner import load_tokenizer, prepare_data
    from finetune.templates import get_template
    from finetune.train import train_run

    tic = time.perf_counter()
    run_dir = ARTIFACTS / f"tier2-{datetime.now(UTC):%Y%m%d-%H%M%S}"
    cfg = load_config("quick", overrides=[*TIER2, f"training.batch_size={batch_size}"])
    tokenizer = load_tokenizer(model_ref.path)
    prepare_data(cfg, run_dir / "data", tokenizer)
    stops = get_template(cfg.data.template, tokenizer=tokenizer).stop_strings
    rows = probe.read_split(run_dir / "data/train.jsonl", N_QUESTIONS)
    prompts, refs = [r["prompt"] for r in rows], [r["reference"] for r in rows]
    questions = load_split(run_dir / "data/train.jsonl", tokenizer, cfg.data.max_seq_length, True)
    seen: dict = {}

    def before(model):
        seen["answers"] = probe.greedy_answers(model, tokenizer, prompts, stops=stops)
        seen["loss"] = probe.teacher_forced_loss(
            model, questions, cfg.training.batch_size, cfg.data.max_seq_length
        )
        seen["lora"], seen["base"] = probe.lora_snapshot(model), probe.base_snapshot(model)
        seen["model"] = model

    result = train_run(cfg, model_ref.path, run_dir / "data", run_dir, load=lambda p: load(str(p)),
                       on_ready=before)  # fmt: skip
    model = seen["model"]
    after = probe.greedy_answers(model, tokenizer, prompts, stops=stops)
    loss_after = probe.teacher_forced_loss(model, questions, cfg.training.batch_size, cfg.data.max_seq_length)
    lora_after, base_after = probe.lora_snapshot(model), probe.base_snapshot(model)
    del model, seen["model"]

    # Same model, batch and sequence lengths, each in its own process so peaks do not mix.
    save_config(cfg, run_dir / "probe.yaml")
    peaks = {t: measure_in_subprocess(run_dir / "probe.yaml", model_ref.path, run_dir / "data", t)
             for t in ("lora", "full")}  # fmt: skip

    g = cfg.gates
    atomic_write_json(run_dir / "summary.json", {"train": result.to_dict(), "memory": peaks})
    verdicts = [
        validate.loss_convergence(
            validate.train_losses(validate.read_metrics(run_dir / "metrics.jsonl")),
            drop=g.loss_drop,
            window=g.loss_window,
        ),  # fmt: skip
        validate.model_learning(
            seen["answers"],
            after,
            refs,
            loss_before=seen["loss"],
            loss_after=loss_after,
            threshold=g.learning_improvement,
        ),  # fmt: skip
        validate.memory_efficiency(
            peaks["lora"]["peak_bytes"], peaks["full"]["peak_bytes"], saving=g.memory_saving
        ),
        validate.parameter_updates(
            seen["lora"],
            lora_after,
            seen["base"],
            base_after,
            steps=result.steps,
            threshold=g.lora_params_changed,
        ),  # fmt: skip
        validate.artifacts(run_dir, load_adapter=lambda p: load(str(model_ref.path), adapter_path=str(p))),
    ]
    report = {
        "tier": 2,
        "status": "passed" if all(v.passed for v in verdicts) else "failed",
        "model": model_ref.name,
        "model_path": str(model_ref.path),
        "run_dir": str(run_dir),
        "seconds": round(time.perf_counter() - tic, 1),
        "gates": [v.to_dict() for v in verdicts],
    }
    atomic_write_json(run_dir / "gates.json", report)
    atomic_write_json(ARTIFACTS / "tier2-last.json", {k: v for k, v in report.items() if k != "gates"})
    for v in verdicts:
        print(v)
    print(f"tier 2: {report['status']} in {report['seconds']} s; verdicts in {run_dir / 'gates.json'}")
    return {v.name: v for v in verdicts}


@pytest.mark.parametrize(
    "gate", ["loss_convergence", "model_learning", "memory_efficiency", "parameter_updates", "artifacts"]
)
def test_gate(tier2, gate):
    verdict = tier2[gate]
    assert verdict.passed, str(verdict)
