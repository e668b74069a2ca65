"""Load a model folder's Hugging Face tokenizer (the one training and evaluation tokenize with)."""

from __future__ import annotations

from pathlib import Path
from typing import Any


def load_tokenizer(model_path: str | Path) -> Any:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path))
