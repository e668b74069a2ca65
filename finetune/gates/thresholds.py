"""The gates' numbers, declared once: each gates.<key> with its default, bounds and meaning (the config schema's
fields are built from these rows; the gate table in finetune.gates.registry names which gate uses which)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Threshold:
    """A gates.<key> number: its default and bounds (the config schema's field is built from this row)."""

    key: str
    default: float
    setting: str  # what the number means, for the config's description
    ge: float | None = None
    gt: float | None = None
    le: float | None = None
    lt: float | None = None


# The gates' numbers (a structured one, gates.logprob_max_abs, per GGUF type, is in the config schema).
THRESHOLDS = (
    Threshold(
        "loss_drop", 0.05, "minimum relative drop of the mean training loss, last vs first window", ge=0, lt=1
    ),
    Threshold(
        "learning_improvement",
        0.30,
        "minimum share of probe answers the saved adapter gets right that the base did not",
        ge=0,
        le=1,
    ),
    Threshold(
        "memory_saving", 0.30, "minimum relative saving of LoRA's peak memory vs full fine-tuning", ge=0, lt=1
    ),
    Threshold(
        "lora_params_changed", 0.80, "minimum share of adapter elements that moved from step 0", ge=0, le=1
    ),
    Threshold(
        "val_loss_drop",
        0.02,
        "minimum relative drop of the validation loss, best vs before training",
        ge=0,
        lt=1,
    ),
    Threshold(
        "max_perplexity_ratio",
        5.0,
        "maximum ratio of base + adapter's perplexity on general text (never trained on) to the base's",
        ge=1,
    ),
    Threshold(
        "fuse_max_rel", 1e-3, "maximum relative error of a fused weight vs base + scale * B^T A^T", gt=0
    ),
    Threshold(
        "text_agreement", 0.9, "minimum share of greedy answers equal to base + adapter in MLX", ge=0, le=1
    ),
    Threshold(
        "adapter_min_score", 0.5, "minimum share of trained answers each fine-tuned runtime gives", ge=0, le=1
    ),
    Threshold(
        "heldout_min_score",
        0.5,
        "minimum share of held-out paraphrases of trained facts that base + adapter answers right",
        ge=0,
        le=1,
    ),
    Threshold(
        "adapter_floor_multiple",
        10.0,
        "how many times the runtimes' own difference (base vs base) an exported adapter may differ by",
        ge=1,
    ),
    # a quantized GGUF vs the f16 GGUF of the same model, next-token distributions on held-out text (llama.cpp)
    Threshold("quant_kl_mean_max", 0.12, "maximum mean KL(f16 || quantized)", gt=0),
    Threshold("quant_kl_p99_max", 0.95, "maximum 99th-percentile KL(f16 || quantized)", gt=0),
    Threshold("quant_top1_min", 0.80, "minimum share of positions whose top token is the f16's", ge=0, le=1),
    Threshold("quant_ppl_ratio_max", 1.20, "maximum perplexity of the quantized GGUF / the f16's", ge=1),
    Threshold(
        "quant_answers_kept",
        0.75,
        "minimum share of the f16 GGUF's right training and held-out answers the quantized one still gives, "
        "in llama.cpp and in Ollama",
        ge=0,
        le=1,
    ),
)
