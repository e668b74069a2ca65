"""The evaluation probes: training questions (answers known) and held-out paraphrases, from the run's data."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune.system.jsonl import read_jsonl

# The GGUF tokenizer gate's fixed text set: what differs between tokenizers shows up in these.
TOKENIZER_TEXTS = [
    "Hello world! The quick brown fox jumps over the lazy dog.",
    "Unicode: héllo wörld, naïve café, Ελληνικά, русский, 日本語, 🚀🦙 emoji.",
    "Digits 0 12 345 6789 3.14159 1,000,000 and 2026-11-22.",
    "def add(a, b):\n    return a + b  # code\n\tindented\n\n",
    "   leading spaces, trailing spaces   ",
    "Line\n\nbreaks\r\n and\ttabs  mixed\n \n",
    # Unicode numbers: llama.cpp's "smollm" pre-tokenizer splits every \p{N}; an HF tokenizer rebuilt from
    # a GGUF by transformers lost SmolLM2's Digits step and merges " ½" differently.
    "Fractions ½ ¼, powers x² y³, circled ① and Roman Ⅻ.",
]


@dataclass(frozen=True)
class EvalPrompt:
    kind: str  # "train" or "heldout"
    question: str  # the last user message (what a runtime with its own template renders)
    prompt: str  # the conversation rendered with the training template, ready for the assistant's answer
    reference: str
    category: str = ""
    messages: tuple = ()  # the conversation up to the question, for /api/chat


def build_prompts(data_dir: Path, template: Any, *, n_train: int, n_heldout: int) -> list[EvalPrompt]:
    """The first n_train rows of train.jsonl and n_heldout rows of heldout.jsonl (when the source has one)."""
    data_dir = Path(data_dir)
    out = []
    for i, row in enumerate(read_jsonl(data_dir / "train.jsonl")[:n_train]):
        messages = row.get("conversation")
        if not messages:
            raise ValueError(
                f"{data_dir / 'train.jsonl'}: row {i + 1} is raw text: there is no question to ask"
            )
        out.append(_prompt("train", messages[:-1], template, row["reference"], row.get("kind", "")))
    heldout = data_dir / "heldout.jsonl"
    if heldout.is_file():
        for row in read_jsonl(heldout)[:n_heldout]:
            out.append(
                _prompt("heldout", row["messages"][:-1], template, row["reference"], row.get("kind", ""))
            )
    return out


def _prompt(kind: str, messages: list[dict], template: Any, reference: str, category: str) -> EvalPrompt:
    question, prompt = messages[-1]["content"], template.render_prompt(messages)
    return EvalPrompt(kind, question, prompt, reference, category, tuple(dict(m) for m in messages))
