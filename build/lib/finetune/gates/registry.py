"""Every gate FineTune has: what it measures, the config threshold it uses, and why it exists.

The tiers name the gates they require from this table; the README's gate table is checked against it.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Gate:
    name: str
    measures: str
    threshold: str  # the gates.<key> it compares with
    why: str  # the fault it exists to catch


GATES: dict[str, Gate] = {
    g.name: g
    for g in (
        Gate("loss_convergence", "mean training loss of the last vs the first `loss_window` steps (metrics.jsonl)",
             "loss_drop", "lr ~ 0, frozen adapters or a broken loss leave the curve flat"),
        Gate("model_learning", "training questions answered better by base + SAVED adapter than by the base, and "
             "teacher-forced loss before/after", "learning_improvement", "an adapter that does not change answers"),
        Gate("memory_efficiency", "peak memory of LoRA vs full fine-tuning, each measured in its own process "
             "(estimated, and labelled so, when full fine-tuning would not fit)", "memory_saving",
             "LoRA mis-wired so that everything trains"),
        Gate("parameter_updates", "share of adapter elements that moved from the saved step-0 adapter; only adapter "
             "tensors in the adapter file; base model files byte-identical to their recorded sha256",
             "lora_params_changed", "frozen adapters, or a base weight trained"),
        Gate("artifacts", "run files present and parseable; base + SAVED adapter loads and reproduces the in-memory "
             "model's probe answers", "-", "an adapter saved wrong (scale 0, truncated, wrong keys)"),
        Gate("label_mask", "decoded loss-carrying tokens of the batches training used vs the assistant answers",
             "-", "prompt tokens trained (mask_prompt ignored), or answers not trained"),
        Gate("fuse_exactness", "every adapted weight of the fused folder == base + scale * B^T A^T; every other "
             "tensor bitwise equal to the base", "fuse_max_rel", "a fuse that drops the adapter or alters other tensors"),
        Gate("gguf_tokenizer", "llama.cpp's tokenization of the GGUF vs the HF tokenizer's own encode on a fixed "
             "multilingual/digits/whitespace/special-token text set", "-", "a mislabelled pre-tokenizer or vocab"),
        Gate("logprob_parity", "top-10 next-token logprobs of the GGUF in llama.cpp vs the fused model in MLX",
             "logprob_max_abs", "a wrong tensor layout or broken export"),
        Gate("output_parity", "greedy answers of fused MLX, llama.cpp and Ollama vs base + adapter in MLX",
             "text_agreement", "a runtime that serves different weights (e.g. the base)"),
        Gate("adapter_effect", "every fine-tuned runtime answers training questions unlike the base and correctly",
             "adapter_min_score", "the adapter lost on the way to a runtime"),
        Gate("clean_endings", "every fine-tuned answer ends on an end token, with no chat-control text shown",
             "-", "missing stop strings or a wrong end token"),
        Gate("served_answers", "Ollama's answers to known training questions equal MLX + adapter's",
             "text_agreement", "a served TEMPLATE that renders prompts unlike training"),
        Gate("served_template", "the TEMPLATE and stop strings Ollama serves equal the ones the training template "
             "needs (derived independently of the Modelfile)", "-", "a Modelfile with another format's template "
             "or without stop strings"),
        Gate("served_api", "streaming == non-streaming, concurrent requests at temperature 0 identical, unknown "
             "model -> 404, bad options rejected", "-", "a server that answers inconsistently or accepts garbage"),
    )
}  # fmt: skip
