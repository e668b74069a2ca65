"""The evaluation probes: training questions (answers known) and held-out paraphrases, from the run's data."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, replace
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
    # Where pre-tokenizers and normalizers part ways (issue 19): apostrophes, URLs and e-mail, code, long digit
    # runs, CJK, Thai, right-to-left scripts, NBSP / zero-width / combining marks, special-token text typed
    # inside content, leading spaces. All equal on SmolLM2's GGUF here.
    "Don't, won't, it's, we'll, they're; rock 'n' roll and O'Neill's \u2018curly\u2019 quotes.",
    "Visit https://example.com/a/b?x=1&y=%20z#frag or mail jane.doe+tag@example.co.uk today.",
    'for (int i = 0; i < n; ++i) { sum += a[i] * b[i]; } // C\nx = {"k": [1, 2]}  # py\n<div class="x">&amp;</div>',
    "Card 4111111111111111, pi 3.14159265358979323846, year 20261205, 0000001.",
    "中文测试：你好，世界。日本語のテキスト、한국어 문장.",
    "ภาษาไทยไม่มีช่องว่างระหว่างคำ และ ตัวเลข ๑๒๓.",
    "العربية من اليمين إلى اليسار، وעברית גם כן.",
    "non\u00a0breaking\u00a0spaces, zero\u200bwidth\u200cjoiners\u200d, and e\u0301 combining vs \u00e9.",
    "User typed <|im_start|>assistant and <|im_end|> and </s> inside content.",
    " leading space",
    "  two leading spaces",
]


@dataclass(frozen=True)
class EvalPrompt:
    kind: str  # "train" or "heldout"
    question: str  # the last user message (what a runtime with its own template renders)
    prompt: str  # the conversation rendered with the training template, ready for the assistant's answer
    reference: str
    category: str = ""
    messages: tuple = ()  # the conversation up to the question, for /api/chat
    paraphrase: bool = False  # a held-out rephrasing of a trained fact (built-in sets), not a fresh question


def build_prompts(data_dir: Path, template: Any, *, n_train: int, n_heldout: int) -> list[EvalPrompt]:
    """The first n_train rows of train.jsonl, then n_heldout held-out questions: heldout.jsonl's (a built-in
    set's paraphrases of trained facts and fresh skill questions) or, without one, the test split's."""
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
            p = _prompt("heldout", row["messages"][:-1], template, row["reference"], row.get("kind", ""))
            out.append(replace(p, paraphrase="paraphrase_of" in row))
    elif (data_dir / "test.jsonl").is_file():
        rows = [
            r for r in read_jsonl(data_dir / "test.jsonl") if r.get("conversation") and r.get("reference")
        ]
        for row in rows[:n_heldout]:
            out.append(
                _prompt("heldout", row["conversation"][:-1], template, row["reference"], row.get("kind", ""))
            )
    return out


def _prompt(kind: str, messages: list[dict], template: Any, reference: str, category: str) -> EvalPrompt:
    question, prompt = messages[-1]["content"], template.render_prompt(messages)
    return EvalPrompt(kind, question, prompt, reference, category, tuple(dict(m) for m in messages))


def long_context_text(data_dir: Path, min_chars: int) -> str:
    """At least min_chars of text in the run's own format: its training rows as rendered for training, with the
    general texts (finetune.evaluate.general_text) between them, repeated as needed."""
    from finetune.evaluate.general_text import GENERAL_TEXTS
    from finetune.system.jsonl import read_jsonl

    rows = [r["text"] for r in read_jsonl(Path(data_dir) / "train.jsonl") if r.get("text")]
    general = itertools.cycle(GENERAL_TEXTS)
    parts = [x for row in rows for x in (row, next(general))] or list(GENERAL_TEXTS)
    out = ""
    while len(out) < min_chars:
        out += "\n\n".join(parts) + "\n\n"
    return out
