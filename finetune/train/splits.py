"""The prepared splits read back as token rows, and the rows training used recorded for the label-mask gate."""

from __future__ import annotations

import json
from pathlib import Path

from finetune import faults
from finetune.data.tokens import tokenize_example
from finetune.system.atomic import atomic_write_json
from finetune.train.batches import TokenDataset


def load_split(path: Path, tokenizer, max_seq_length: int, mask_prompt: bool) -> TokenDataset:
    """Read a prepared split (train/valid/test.jsonl) and tokenize it once."""
    items, rows = [], []
    with open(path, encoding="utf-8") as fh:
        for line_no, line in enumerate(fh, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                ids, mask = tokenize_example(
                    tokenizer, row["text"], row.get("train_spans") or [], max_seq_length, mask_prompt
                )
            except (json.JSONDecodeError, KeyError) as exc:
                raise ValueError(f"{path}:{line_no}: not a prepared example ({exc})") from None
            mask = faults.point("end_marker_untrained", faults.point("mask_prompt_ignored", mask))
            if sum(mask[1:]) == 0:
                continue  # nothing to learn after truncation
            items.append((ids, mask))
            rows.append(line_no - 1)
    if not items:
        raise ValueError(f"{path}: no usable examples after tokenization (max_seq_length={max_seq_length})")
    return TokenDataset(items, str(path), rows)


TOKENS = "train_tokens.json"
TOKENS_KEPT = 256  # rows of the training set recorded for the label-mask gate


def record_tokens(dataset, path: Path) -> None:
    """The token ids and loss masks training really used (the first TOKENS_KEPT rows), with their row numbers."""
    pairs = zip(dataset.rows, dataset.items, strict=True)
    rows = [{"row": r, "ids": ids, "mask": mask} for r, (ids, mask) in pairs][:TOKENS_KEPT]
    atomic_write_json(path, {"source": dataset.source, "rows": rows})
