"""Tier 1's fakes: the model and the trainer (and the measurements that need a real model) replaced, all else real.

The fake trainer writes what train_run writes (metrics, step-0 and final adapters as real safetensors,
checkpoints, the recorded training tokens, the in-memory probe answers); its loss falls at a rate set by
the learning rate (flat at lr = 0) and its adapter moves only when lr > 0. The real gates then judge these
files, so tier 1 exercises every gate's pass and fail paths without a model.
"""

from __future__ import annotations

import json
import math
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

from finetune.data.prepare import prepare_for_run, read_report
from finetune.evaluate.run_measurements import (
    IN_MEMORY,
    PROBES,
    LearningMeasurement,
    masked_rows,
    probe_questions,
)
from finetune.stages import versions
from finetune.stages.context import Deps
from finetune.system.atomic import atomic_write_json
from finetune.train.engine import RESULT
from finetune.train.memory import from_run_config
from finetune.train.peak_memory import MemoryMeasurement
from finetune.train.splits import TOKENS, load_split, record_tokens

SMOLLM2_SHAPE = {
    "model_type": "llama", "hidden_size": 576, "num_hidden_layers": 30, "num_attention_heads": 9,
    "num_key_value_heads": 3, "intermediate_size": 1536, "vocab_size": 49152, "tie_word_embeddings": True,
    "torch_dtype": "float32",  # what models.packaged builds; in bf16 LoRA can cost more than full
}  # fmt: skip


def _save(folder: Path, tensors: dict[str, np.ndarray], acfg: dict) -> None:
    from safetensors.numpy import save_file

    folder.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(folder / "adapters.safetensors"))
    (folder / "adapter_config.json").write_text(json.dumps(acfg))


class FakeTrainer:
    """Writes what train_run writes; interrupt_at stops it there (as a signal would) and raises."""

    def __init__(self, interrupt_at: int | None = None, interrupt: BaseException | None = None):
        self.calls: list[dict] = []
        self.interrupt_at, self.interrupt = interrupt_at, interrupt

    def __call__(self, cfg, model_path, data_dir, run_dir, *, resume=False, on_trained=None, log=print, **_):
        run_dir = Path(run_dir)
        self.calls.append({"cfg": cfg, "data_dir": Path(data_dir), "resume": resume})
        assert (Path(data_dir) / "train.jsonl").stat().st_size > 0, "trainer called before data was prepared"
        tokenizer = self.tokenizer
        train_set = load_split(
            Path(data_dir) / "train.jsonl", tokenizer, cfg.data.max_seq_length, cfg.data.mask_prompt
        )
        record_tokens(train_set, run_dir / TOKENS)
        rng = np.random.default_rng(cfg.training.seed)
        init = {"model.layers.1.self_attn.q_proj.lora_a": rng.normal(0, 0.01, (64, 8)).astype(np.float32),
                "model.layers.1.self_attn.q_proj.lora_b": np.zeros((8, 64), np.float32)}  # fmt: skip
        acfg = {
            "fine_tune_type": "lora",
            "num_layers": 2,
            "lora_parameters": {"rank": 8, "scale": 20.0, "dropout": 0.0},
        }
        _save(run_dir / "adapter_init", init, acfg)
        steps = cfg.training.iters if self.interrupt_at is None else self.interrupt_at
        rate = cfg.training.learning_rate * 100
        rows = [
            {"kind": "train", "step": s, "train_loss": 3.0 * math.exp(-rate * s)} for s in range(1, steps + 1)
        ]
        (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
        final = {
            k: v + (rng.normal(0, 0.01, v.shape).astype(np.float32) if rate else 0) for k, v in init.items()
        }
        _save(run_dir / f"checkpoints/step-{steps:07d}", final, acfg)
        if self.interrupt_at is not None:
            raise self.interrupt or KeyboardInterrupt()
        _save(run_dir / "adapter", final, acfg)
        if on_trained is not None:  # what the stage's hook (record_in_memory) would write
            answers = fake_answers(run_dir, cfg, learned=rate > 0)
            atomic_write_json(run_dir / PROBES / IN_MEMORY, {"answers": answers})
        val = {
            "initial_val_loss": 3.2,
            "best_val_loss": 3.2 * math.exp(-rate * steps / 2),
        }  # flat when lr is 0
        atomic_write_json(run_dir / RESULT, {"steps": steps, "start_step": 0, **val})
        return SimpleNamespace(to_dict=lambda: {"steps": steps, "interrupted": None})


def fake_answers(run_dir: Path, cfg: Any, *, learned: bool) -> list[str]:
    probes = probe_questions(Path(run_dir) / "data", cfg.gates.learning_probes)  # the real probes
    return [p.reference if learned else "I do not know." for p in probes]


def fake_learning(run_dir, base, cfg, stops, **_):
    """What base + saved adapter would answer: right when the fake adapter moved (lr > 0)."""
    learned = cfg.training.learning_rate > 0
    probes = probe_questions(Path(run_dir) / "data", cfg.gates.learning_probes)
    return LearningMeasurement(before=["I do not know."] * len(probes), after=fake_answers(run_dir, cfg, learned=learned),
                               references=[p.reference for p in probes], loss_before=3.0,
                               loss_after=1.0 if learned else 3.0, general_before=3.0,
                               general_after=3.0 + 0.1 * learned)  # fmt: skip


def fake_memory(run_dir, model_dir, model_config, cfg, *, available, **_):
    full_cfg, data = cfg.model_copy(deep=True), read_report(Path(run_dir) / "data")
    full_cfg.training.fine_tune_type = "full"
    lora = from_run_config(model_config, cfg, data).total_bytes
    full = from_run_config(model_config, full_cfg, data).total_bytes
    return MemoryMeasurement(lora, full, "estimated", "tier 1: the estimator stands in for the measurement")


def fake_model_folder(root: Path, tokenizer: Any, name: str) -> SimpleNamespace:
    """A model folder with a SmolLM2-shaped config.json and the toy tokenizer: enough for every stage but train."""
    folder = root / name.replace("/", "_")
    if not (folder / "config.json").is_file():
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(SMOLLM2_SHAPE))
        tokenizer.save_pretrained(str(folder))
        (folder / "model.safetensors").write_bytes(b"fake weights")
    return SimpleNamespace(name=name, path=folder, source="fake", config=dict(SMOLLM2_SHAPE), license=None)


def fake_deps(tokenizer: Any, models_root: Path, trainer: FakeTrainer | None = None, calls: list | None = None,
              **overrides: Any) -> Deps:  # fmt: skip
    calls = [] if calls is None else calls
    trainer = trainer or FakeTrainer()
    trainer.tokenizer = tokenizer

    def record(name, fn):
        def inner(*args, **kwargs):
            calls.append(name)
            return fn(*args, **kwargs)

        return inner

    def unused(what: str):
        def fail(*_a, **_k):
            raise AssertionError(f"tier 1 does not {what}")

        return fail

    deps = Deps(
        resolve_model=record("model", lambda spec: fake_model_folder(models_root, tokenizer, spec)),
        load_tokenizer=lambda _path: tokenizer,
        prepare_data=record("data", prepare_for_run),
        estimate=record("estimate", lambda cfg, model_config, data: from_run_config(model_config, cfg, data)),
        train=record("train", trainer),
        measure_learning=record("learning", fake_learning),
        measure_memory=record("memory", fake_memory),
        masked_rows=masked_rows,
        fuse=unused("fuse"), measure_fuse=unused("fuse"), export_gguf=unused("export"), check_gguf=unused("export"),
        locate_ollama=unused("serve"), ollama_server=unused("serve"), deploy=unused("serve"),
        served_checks=unused("serve"), ollama_answers=unused("serve"), openai_answers=unused("serve"), llamacpp_reason=lambda: "tier 1",
        evaluate=unused("evaluate"), collect_env=lambda: {"tier": 1}, describe_machine=lambda: "machine: fake (tier 1)", available_memory=lambda: 8 * 2**30,
        tool_version=versions.tool_version, ollama_version=versions.ollama_version,
    )  # fmt: skip
    return replace(deps, **overrides)
