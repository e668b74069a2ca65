"""Datasets: load local files or Hugging Face datasets, normalize records, and prepare mlx-lm style splits.

Reading files and the Hub is in finetune.data_sources, tokenizing and loss masks in finetune.tokens.

Bad rows are collected as Rejections (1-based line/item/row + reason) instead of aborting the load.
"""

from __future__ import annotations

import json
import math
import os
import random
import statistics
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune.atomic import atomic_write_text
from finetune.data_sources import DatasetError, _hub_reachable, _load_hub, _Reject, _rows
from finetune.data_sources import DatasetNotFoundError as DatasetNotFoundError  # re-exported: public
from finetune.templates import Template, TemplateError, get_template, validate_messages
from finetune.tokens import _encode, _mask

FORMATS = ("auto", "alpaca", "chat", "completion", "text")
FORMAT_ALIASES = {"prompt_completion": "completion", "completions": "completion", "messages": "chat"}
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}
SPLIT_NAMES = ("train", "valid", "test")
MAX_LISTED = 20  # cap on line numbers listed in reports and error messages


@dataclass(frozen=True)
class Rejection:
    line: int
    reason: str
    unit: str = "line"  # "line" for JSONL/CSV, "item" for a JSON array, "row" for a datasets table

    def __str__(self) -> str:
        return f"{self.unit} {self.line}: {self.reason}"


@dataclass
class Example:
    """One normalized record: a conversation (messages) or raw text trained as a whole."""

    line: int
    shape: str  # alpaca | chat | completion | text
    messages: list[dict] | None = None
    text: str | None = None
    reference: str = ""
    kind: str | None = None


@dataclass
class LoadResult:
    source: str
    examples: list[Example]
    rejected: list[Rejection]
    rows_read: int
    unit: str = "line"


# ---------------------------------------------------------------- normalizing records


def _field(row: dict, key: str, *, required: bool = True, allow_empty: bool = False) -> str:
    value = row.get(key)
    if value is None:
        if required:
            raise _Reject(f"missing field {key!r}")
        return ""
    if not isinstance(value, str):
        raise _Reject(f"field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip() and not allow_empty:
        raise _Reject(f"empty field {key!r}")
    return value.strip()


def _detect_shape(row: dict) -> str:
    if "messages" in row or "conversations" in row:
        return "chat"
    if "instruction" in row:
        return "alpaca"
    if "prompt" in row and "completion" in row:
        return "completion"
    if "text" in row:
        return "text"
    if "prompt" in row or "completion" in row:
        return "completion"
    keys = ", ".join(sorted(map(str, row))) or "none"
    raise _Reject(
        f"unrecognized record (keys: {keys}); expected 'messages', 'instruction'+'output', "
        "'prompt'+'completion' or 'text'"
    )


def _chat_messages(row: dict) -> list[dict]:
    key = "messages" if "messages" in row else "conversations"
    raw = row.get(key)
    if isinstance(raw, str):  # CSV cells and some exports hold the list as a JSON string
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise _Reject(f"field {key!r} is a string but not a JSON list ({exc.msg})") from exc
    if raw is None:
        raise _Reject(f"missing field {key!r}")
    if not isinstance(raw, list) or not raw:
        raise _Reject(f"field {key!r} must be a non-empty list of messages")
    messages = []
    for i, msg in enumerate(raw):
        if not isinstance(msg, dict):
            raise _Reject(f"{key}[{i}] must be an object, got {type(msg).__name__}")
        role = msg.get("role", msg.get("from"))
        content = msg.get("content", msg.get("value"))
        if role is None or content is None:
            raise _Reject(f"{key}[{i}] needs 'role' and 'content'")
        if not isinstance(content, str):
            raise _Reject(f"{key}[{i}].content must be a string, got {type(content).__name__}")
        if not content.strip():
            raise _Reject(f"{key}[{i}].content is empty")
        messages.append({"role": ROLE_ALIASES.get(role, role), "content": content.strip()})
    try:
        validate_messages(messages)
    except TemplateError as exc:
        raise _Reject(str(exc)) from exc
    return messages


def normalize_record(row: Any, position: int, format: str = "auto") -> Example:
    """Normalize one raw record; raises _Reject with a specific reason for unusable rows."""
    if isinstance(row, _Reject):
        raise row
    if not isinstance(row, dict):
        raise _Reject(f"expected a JSON object, got {type(row).__name__}")
    shape = _detect_shape(row) if format == "auto" else format
    if shape == "text":
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise _Reject(
                "missing field 'text'" if text is None else "field 'text' must be a non-empty string"
            )
        return Example(position, "text", text=text)
    if shape == "chat":
        messages = _chat_messages(row)
    elif shape == "alpaca":
        instruction, extra = (
            _field(row, "instruction"),
            _field(row, "input", required=False, allow_empty=True),
        )
        output = _field(row, "output")
        system = _field(row, "system", required=False, allow_empty=True)
        user = f"{instruction}\n\n{extra}" if extra else instruction
        messages = [{"role": "system", "content": system}] if system else []
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    else:
        messages = [
            {"role": "user", "content": _field(row, "prompt")},
            {"role": "assistant", "content": _field(row, "completion")},
        ]
    reference = row.get("reference")
    reference = (
        reference.strip() if isinstance(reference, str) and reference.strip() else messages[-1]["content"]
    )
    kind = row.get("kind") if isinstance(row.get("kind"), str) else None
    return Example(position, shape, messages=messages, reference=reference, kind=kind)


def load_records(
    source: str | os.PathLike,
    format: str = "auto",
    *,
    split: str = "train",
    is_online: Callable[[], bool] = _hub_reachable,
    hub_loader: Callable[[str, str], Any] = _load_hub,
) -> LoadResult:
    """Read and normalize every record; raise DatasetError when no row is usable."""
    fmt = FORMAT_ALIASES.get(format, format)
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {format!r}; valid: {', '.join(FORMATS)}")
    source = os.fspath(source)
    unit, rows = _rows(source, split, is_online, hub_loader)
    examples, rejected, read = [], [], 0
    for position, row in rows:
        read += 1
        try:
            examples.append(normalize_record(row, position, fmt))
        except _Reject as exc:
            rejected.append(Rejection(position, str(exc), unit))
    if not examples:
        detail = "; ".join(map(str, rejected[:3])) + ("; ..." if len(rejected) > 3 else "")
        why = f"{len(rejected)} rejected: {detail}" if rejected else "no records found"
        raise DatasetError(f"{source}: no usable rows ({why})")
    return LoadResult(source, examples, rejected, read, unit)


# ---------------------------------------------------------------- preparing splits


@dataclass
class PrepareReport:
    source: str
    out_dir: str
    template: str
    seed: int
    splits: tuple[float, float, float]
    max_seq_length: int
    mask_prompt: bool
    rows_read: int
    rows_used: int
    rejected: list[Rejection]
    duplicates_removed: int
    duplicate_lines: list[int]
    split_counts: dict[str, int]
    shapes: dict[str, int]
    length_unit: str  # "tokens" with a tokenizer, otherwise "chars"
    length_stats: dict[str, float]
    truncated_share: float | None = None
    rows_without_trained_tokens: int | None = None
    notes: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        out["splits"] = list(self.splits)
        out["rejected"] = [{"line": r.line, "unit": r.unit, "reason": r.reason} for r in self.rejected]
        return out


def split_counts(n: int, splits: Sequence[float]) -> dict[str, int]:
    """Rows per split; each split gets at least one row or DatasetError explains why it cannot."""
    if len(splits) != 3 or any(not 0 < s < 1 for s in splits) or abs(sum(splits) - 1) > 1e-6:
        raise ValueError(f"splits must be three fractions in (0, 1) summing to 1, got {tuple(splits)}")
    valid, test = max(1, round(n * splits[1])), max(1, round(n * splits[2]))
    if n - valid - test < 1:
        raise DatasetError(
            f"only {n} usable rows: too few for splits {tuple(splits)}; train, valid and test each need at "
            "least 1 row (3 rows minimum)"
        )
    return {"train": n - valid - test, "valid": valid, "test": test}


def _stats(values: Sequence[int]) -> dict[str, float]:
    ordered = sorted(values)

    def pct(p: float) -> int:
        return ordered[max(0, math.ceil(p * len(ordered)) - 1)]

    return {
        "min": ordered[0],
        "mean": round(statistics.fmean(ordered), 2),
        "p50": pct(0.5),
        "p95": pct(0.95),
        "max": ordered[-1],
    }


def _render(example: Example, template: Template, mask_prompt: bool) -> dict:
    if example.text is not None:
        text, spans, prompt = example.text, [(0, len(example.text))], ""
    else:
        rendered = template.render(example.messages)
        text, spans, prompt = rendered.text, rendered.train_spans, rendered.prompt
    if not mask_prompt:
        spans = [(0, len(text))]
    row = {
        "text": text,
        "train_spans": [list(s) for s in spans],
        "prompt": prompt,
        "reference": example.reference,
    }
    if example.kind:
        row["kind"] = example.kind
    return row


def prepare(
    source: str | os.PathLike,
    out_dir: str | os.PathLike,
    *,
    template: str | Template,
    seed: int = 0,
    splits: Sequence[float] = (0.8, 0.1, 0.1),
    max_seq_length: int = 512,
    mask_prompt: bool = True,
    tokenizer: Any = None,
    format: str = "auto",
    load: Callable[..., LoadResult] = load_records,
) -> PrepareReport:
    """Load, render, dedupe, shuffle and split into out_dir/{train,valid,test}.jsonl + prepare_report.json."""
    tmpl = template if isinstance(template, Template) else get_template(template, tokenizer)
    loaded = load(source, format)
    rejected = list(loaded.rejected)
    rows, seen, dup_lines = [], set(), []
    for ex in loaded.examples:
        try:
            row = _render(ex, tmpl, mask_prompt)
        except TemplateError as exc:
            rejected.append(Rejection(ex.line, f"template {tmpl.name!r}: {exc}", loaded.unit))
            continue
        if row["text"] in seen:
            dup_lines.append(ex.line)
            continue
        seen.add(row["text"])
        rows.append((ex, row))
    if not rows:
        detail = "; ".join(map(str, rejected[:3]))
        raise DatasetError(
            f"{loaded.source}: no usable rows after rendering ({len(rejected)} rejected: {detail})"
        )
    counts = split_counts(len(rows), splits)
    random.Random(seed).shuffle(rows)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    files, start = {}, 0
    for name in SPLIT_NAMES:
        chunk = rows[start : start + counts[name]]
        start += counts[name]
        path = out / f"{name}.jsonl"
        atomic_write_text(path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for _, r in chunk))
        files[name] = str(path)

    notes = []
    truncated = untrained = None
    if tokenizer is not None:
        unit, lengths, truncated, untrained = "tokens", [], 0, 0
        for _, r in rows:
            ids, offsets = _encode(tokenizer, r["text"])
            lengths.append(len(ids))
            truncated += len(ids) > max_seq_length
            untrained += not any(_mask(offsets[:max_seq_length], r["train_spans"]))
        truncated = round(truncated / len(rows), 4)
        if untrained:
            notes.append(f"{untrained} rows have no trained tokens left after truncation to {max_seq_length}")
    else:
        unit, lengths = "chars", [len(r["text"]) for _, r in rows]
        notes.append("lengths are in characters: token stats and truncation need a tokenizer")
    if any(ex.text is not None for ex, _ in rows):
        notes.append("text-shape rows are trained whole and have no prompt/reference for evaluation")

    report = PrepareReport(
        source=loaded.source,
        out_dir=str(out),
        template=tmpl.name,
        seed=seed,
        splits=tuple(splits),
        max_seq_length=max_seq_length,
        mask_prompt=mask_prompt,
        rows_read=loaded.rows_read,
        rows_used=len(rows),
        rejected=rejected,
        duplicates_removed=len(dup_lines),
        duplicate_lines=dup_lines[:MAX_LISTED],
        split_counts=counts,
        shapes=dict(Counter(ex.shape for ex, _ in rows)),
        length_unit=unit,
        length_stats=_stats(lengths),
        truncated_share=truncated,
        rows_without_trained_tokens=untrained,
        notes=notes,
        files=files,
    )
    report_path = out / "prepare_report.json"
    report.files["report"] = str(report_path)
    atomic_write_text(report_path, json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")
    return report
