"""Every gate FineTune has, declared once: what it measures, the config threshold it uses, why it exists, which
phase judges it, which runtime it needs, and how its measured value reads. The commands' required lists, the
judge's list, the skip rules for missing runtimes and the history's classes are derived from this table; the
README's gate table is checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from finetune.gates.verdict import Verdict
from finetune.system.hashing import path_identity

Phase = Literal["training", "export", "serving"]


@dataclass(frozen=True)
class Gate:
    name: str
    measures: str
    threshold: str  # the gates.<key> it compares with
    why: str  # the fault it exists to catch
    phase: Phase = (
        "training"  # training: the judge stage, from the run's files; export/serving: the ship stages
    )
    runtime: str | None = None  # the runtime it needs: its skip is allowed when that runtime's skip is
    in_pipeline: bool = True  # required by `finetune pipeline` (which judges learning where it ships instead)
    lower_is_better: bool = False  # how a history trend of its measured value reads
    parity: bool = False  # it compares one runtime's output with another's


_ALL = (
    Gate(
        "loss_convergence",
        "mean training loss of the last vs the first `loss_window` steps (metrics.jsonl)",
        "loss_drop",
        "lr ~ 0, frozen adapters or a broken loss leave the curve flat",
        lower_is_better=True,
    ),
    Gate(
        "model_learning",
        "training questions answered better by base + SAVED adapter than by the base, and teacher-forced loss "
        "before/after",
        "learning_improvement",
        "an adapter that does not change answers",
        in_pipeline=False,
    ),
    Gate(
        "memory_efficiency",
        "peak memory of LoRA vs full fine-tuning, each measured in its own process (estimated, and labelled so, "
        "when full fine-tuning would not fit)",
        "memory_saving",
        "LoRA mis-wired so that everything trains",
        in_pipeline=False,
    ),
    Gate(
        "parameter_updates",
        "share of adapter elements that moved from the saved step-0 adapter; only adapter tensors in the adapter "
        "file; base model files byte-identical to their recorded sha256",
        "lora_params_changed",
        "frozen adapters, or a base weight trained",
    ),
    Gate(
        "artifacts",
        "run files present and parseable; base + SAVED adapter loads and reproduces the in-memory model's probe "
        "answers",
        "-",
        "an adapter saved wrong (scale 0, truncated, wrong keys)",
    ),
    Gate(
        "label_mask",
        "decoded loss-carrying tokens of the batches training used vs the assistant answers",
        "-",
        "prompt tokens trained (mask_prompt ignored), or answers not trained",
    ),
    Gate(
        "fuse_exactness",
        "every adapted weight of the fused folder == base + scale * B^T A^T; every other tensor bitwise equal to "
        "the base",
        "fuse_max_rel",
        "a fuse that drops the adapter or alters other tensors",
        phase="export",
        lower_is_better=True,
    ),
    Gate(
        "gguf_tokenizer",
        "llama.cpp's tokenization of the GGUF vs the HF tokenizer's own encode on a fixed "
        "multilingual/digits/whitespace/special-token text set",
        "-",
        "a mislabelled pre-tokenizer or vocab",
        phase="export",
        runtime="llamacpp",
    ),
    Gate(
        "logprob_parity",
        "top-10 next-token logprobs of the GGUF in llama.cpp vs the fused model in MLX",
        "logprob_max_abs",
        "a wrong tensor layout or broken export",
        phase="export",
        runtime="llamacpp",
        lower_is_better=True,
        parity=True,
    ),
    Gate(
        "output_parity",
        "greedy answers of fused MLX, llama.cpp and Ollama vs base + adapter in MLX",
        "text_agreement",
        "a runtime that serves different weights (e.g. the base)",
        phase="serving",
        parity=True,
    ),
    Gate(
        "adapter_effect",
        "every fine-tuned runtime answers training questions unlike the base and correctly",
        "adapter_min_score",
        "the adapter lost on the way to a runtime",
        phase="serving",
    ),
    Gate(
        "clean_endings",
        "every fine-tuned answer ends on an end token, with no chat-control text shown",
        "-",
        "missing stop strings or a wrong end token",
        phase="serving",
    ),
    Gate(
        "served_answers",
        "Ollama's answers to known training questions equal MLX + adapter's",
        "text_agreement",
        "a served TEMPLATE that renders prompts unlike training",
        phase="serving",
        runtime="ollama",
        parity=True,
    ),
    Gate(
        "served_template",
        "the TEMPLATE and stop strings Ollama serves equal the ones the training template needs (derived "
        "independently of the Modelfile)",
        "-",
        "a Modelfile with another format's template or without stop strings",
        phase="serving",
        runtime="ollama",
    ),
    Gate(
        "served_api",
        "streaming == non-streaming, concurrent requests at temperature 0 identical, unknown model -> 404, bad "
        "options rejected",
        "-",
        "a server that answers inconsistently or accepts garbage",
        phase="serving",
        runtime="ollama",
    ),
)
GATES: dict[str, Gate] = {g.name: g for g in _ALL}

# Derived lists (in table order): what the judge stage judges, what `finetune pipeline` requires, and more.
TRAINING_GATES = tuple(g.name for g in _ALL if g.phase == "training")
PIPELINE_GATES = tuple(g.name for g in _ALL if g.in_pipeline)
RUNTIME_OF = {g.name: g.runtime for g in _ALL if g.runtime}
LOWER_IS_BETTER = frozenset(g.name for g in _ALL if g.lower_is_better)
PARITY_GATES = tuple(g.name for g in _ALL if g.parity)


def explain(v: Verdict, judged_path: str | Path | None = None) -> Verdict:
    """Attach what the table knows to a verdict (its why) and, given it, the bytes it judged (path, sha256)."""
    if v.name in GATES:
        v.why = GATES[v.name].why
    if judged_path is not None:
        v.artifact = path_identity(judged_path)
    return v
