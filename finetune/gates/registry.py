"""Every gate FineTune has, declared once: what it measures, the config threshold it uses, why it exists, which
phase judges it, which runtime it needs, and how its measured value reads. The commands' required lists, the
judge's list, the skip rules for missing runtimes and the history's classes are derived from this table; the
README's gate table is checked against it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Literal

from finetune.gates.thresholds import THRESHOLDS

Phase = Literal["training", "export", "serving"]


@dataclass(frozen=True)
class Gate:
    name: str
    measures: str
    threshold: str  # the gates.<key> it compares with
    why: str  # the fault it exists to catch
    phase: Phase = "training"  # training: the judge stage, from the run's files; export/serving: shipping
    runtime: str | None = None  # the runtime it needs: its skip is allowed when that runtime's skip is
    in_pipeline: bool = True  # required by `finetune pipeline` (which judges learning where it ships instead)
    lower_is_better: bool = False  # how its measured value compares with its threshold, and a trend reads
    parity: bool = False  # it compares one runtime's output with another's
    # A training gate judged from the numbers training recorded: train_result.json -> the measured value.
    # Such a gate needs nothing but its row (and its Threshold); the others have a judge in finetune/stages/judge.py.
    metric: Callable[[dict[str, Any]], float] | None = None


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
        "peak memory of LoRA (the run's own training peak) vs full fine-tuning (a probe in its own process, run "
        "beside training when both fit, measured once per model, data, settings and code); when full fine-tuning "
        "would not fit, it is estimated (labelled so), scaled down where the estimator over-estimated the LoRA peak",
        "memory_saving",
        "LoRA mis-wired so that everything trains",
        in_pipeline=False,
    ),
    Gate(
        "parameter_updates",
        "share of adapter elements that moved from the saved step-0 adapter, and every adapter tensor moved; only "
        "adapter tensors in the adapter file; base model files byte-identical to their recorded sha256",
        "lora_params_changed",
        "frozen adapters (all, or one layer's), or a base weight trained",
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
        "decoded loss-carrying tokens of the batches training used vs the assistant answers, each followed by "
        "exactly one end-of-turn marker",
        "-",
        "prompt tokens trained (mask_prompt ignored), answers not trained, or an end marker that carries no loss "
        "(a model that never learns to stop)",
    ),
    Gate(
        "split_overlap",
        "rows of valid.jsonl and test.jsonl that are training rows by content (message words, case folded)",
        "-",
        "a leak between splits: the validation loss and held-out scores would judge memory, not learning",
        lower_is_better=True,
    ),
    Gate(
        "validation_loss",
        "relative drop of the loss on the held-out valid split, best evaluation vs before training "
        "(train_result.json)",
        "val_loss_drop",
        "training that changes nothing beyond its own rows: lr ~ 0, frozen adapters, or answers memorised "
        "without the task",
        metric=lambda result: 1 - result["best_val_loss"] / result["initial_val_loss"],
    ),
    Gate(
        "forgetting",
        "base + SAVED adapter's perplexity on general text no run trains on, as a multiple of the base's",
        "max_perplexity_ratio",
        "a fine-tune that damaged the language the base model had (over-training, a learning rate too high)",
        lower_is_better=True,
    ),
    Gate(
        "peft_parity",
        "next-token logprobs of the PEFT export in transformers + peft vs base + saved adapter in MLX, every "
        "vocabulary entry at every position of 4 training texts, as a multiple of base vs base",
        "adapter_floor_multiple",
        "an adapter exported at the wrong strength (lora_alpha = r: 1/scale of it), transposed or misnamed",
        phase="export",
        in_pipeline=False,  # `finetune export --as peft`
        lower_is_better=True,
        parity=True,
    ),
    Gate(
        "gguf_lora_parity",
        "next-token logprobs of the GGUF LoRA on the base GGUF in llama.cpp (its top-20, f32 KV cache) vs base + "
        "saved adapter in MLX at every position of 4 training texts, as a multiple of base GGUF vs base",
        "adapter_floor_multiple",
        "an adapter shipped for llama.cpp/Ollama at the wrong strength (adapter.lora.alpha = r), or misconverted",
        phase="export",
        in_pipeline=False,  # `finetune export --as gguf-lora`
        lower_is_better=True,
        parity=True,
    ),
    Gate(
        "served_adapter",
        "`finetune export --as gguf-lora`: Ollama serving FROM the base GGUF with ADAPTER (the run's TEMPLATE and "
        "PARAMETERs), default /api/chat requests, vs base + saved adapter in MLX on 8 training questions",
        "text_agreement",
        "an ADAPTER Ollama ignores or applies at the wrong strength, or a base it does not fit",
        phase="export",
        runtime="ollama",
        in_pipeline=False,
        parity=True,
    ),
    Gate(
        "adapters_separate",
        "`finetune export RUN_A RUN_B ... --as gguf-lora --out DIR`: one base GGUF, each run's adapter served "
        "side by side by one Ollama; each model's answers to every run's training questions (default requests)",
        "text_agreement",
        "adapters packaged under each other's names, or one that leaks into another's answers",
        phase="export",
        in_pipeline=False,
        lower_is_better=True,
    ),
    Gate(
        "quant_types",
        "the quantized GGUF's general.file_type and every tensor's type are what llama.cpp writes for the type "
        "asked for (row-size fallbacks included); no tensor missing or reshaped",
        "-",
        "a file shipped under a quantization name it is not (q4_0 as q4_K_M), or tensors left unquantized",
        phase="export",
        runtime="ollama",  # its quantizer
        in_pipeline=False,  # `finetune export --as gguf:TYPE`
        lower_is_better=True,
    ),
    Gate(
        "quant_quality",
        "the quantized GGUF vs the f16 GGUF of the same fused model in llama.cpp, held-out text: KL mean and "
        "p99, top-1 agreement, perplexity ratio",
        "quant_kl_mean_max",
        "a quantization too coarse for the model (q2_K, q4_0 on SmolLM2) or a tensor quantized wrong",
        phase="export",
        runtime="ollama",  # its quantizer
        in_pipeline=False,  # `finetune export --as gguf:TYPE`
        lower_is_better=True,
        parity=True,
    ),
    Gate(
        "quant_answers",
        "the training and held-out questions the f16 GGUF answers right (greedy, the training template), asked of "
        "the quantized GGUF in llama.cpp and of its Modelfile in Ollama (default requests): share still right",
        "quant_answers_kept",
        "a quantization that keeps the distributions close on text but loses what the fine-tune taught",
        phase="export",
        runtime="ollama",  # its quantizer
        in_pipeline=False,  # `finetune export --as gguf:TYPE`
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
        "set of 18 texts (multilingual, CJK, Thai, right-to-left, digits, code, URLs, apostrophes, NBSP and "
        "zero-width marks, special-token text inside content, leading spaces) and the first 4 prompts",
        "-",
        "a mislabelled pre-tokenizer or vocab",
        phase="export",
        runtime="llamacpp",
    ),
    Gate(
        "logprob_parity",
        "next-token logprobs both ways, the GGUF in llama.cpp vs base + saved adapter in MLX, short answers and "
        "a 1024-token context",
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
        "heldout_score",
        "base + adapter on questions training never showed: paraphrases of trained facts right at least the "
        "threshold and more often than the base (without paraphrases: the test split, not below the base)",
        "heldout_min_score",
        "a fine-tune that learned strings, not facts (over-training, a leak that inflated the other scores)",
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
        "the TEMPLATE and stop strings Ollama serves are exactly the ones the training template needs, and "
        "the prompt Ollama rendered for each evaluated conversation has the training render's token ids",
        "-",
        "a Modelfile with another format's template, a user template that renders unlike training, missing "
        "or extra stop strings",
        phase="serving",
        runtime="ollama",
    ),
    Gate(
        "served_defaults",
        "requests without options (as `ollama run`, /api/chat and /v1 users send) get the judged model: "
        "PARAMETERs as configured, num_ctx >= the trained context, num_predict >= the longest answer, /v1 "
        "renders and stops alike",
        "-",
        "a Modelfile whose PARAMETERs (temperature, num_ctx, num_predict) are not what was judged",
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
DEFAULT = {t.key: t.default for t in THRESHOLDS}  # what a gate function assumes when not given its threshold

# Derived lists (in table order): what the judge stage judges, what `finetune pipeline` requires, and more.
TRAINING_GATES = tuple(g.name for g in _ALL if g.phase == "training")
PIPELINE_GATES = tuple(g.name for g in _ALL if g.in_pipeline)
RUNTIME_OF = {g.name: g.runtime for g in _ALL if g.runtime}
LOWER_IS_BETTER = frozenset(g.name for g in _ALL if g.lower_is_better)
PARITY_GATES = tuple(g.name for g in _ALL if g.parity)
