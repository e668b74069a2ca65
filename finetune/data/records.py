"""Records: read every row of a dataset and normalize it to a conversation (or raw text).

Four shapes are accepted: Alpaca (instruction/input/output), chat (messages), prompt/completion and text.
Bad rows are collected as Rejections (1-based line/item/row + reason) instead of aborting the load.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from finetune.data.sources import DatasetError, Reject, hub_reachable, load_hub, rows_of
from finetune.data.templates import TemplateError, validate_messages

FORMATS = ("auto", "alpaca", "chat", "completion", "text")
FORMAT_ALIASES = {"prompt_completion": "completion", "completions": "completion", "messages": "chat"}
ROLE_ALIASES = {"human": "user", "gpt": "assistant", "bot": "assistant", "model": "assistant"}


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


# Every text is stripped, a code answer's first-line indentation too: leading spaces would merge with the chat
# template's newline into one token ("\n   " in SmolLM2) that the served prompt, which ends in "\n", never has.
# Kept, HumanEval's healthy quick run learned 11/16 (1 exact) instead of 15/16 (9 exact), 2026-12-06.
def _field(row: dict, key: str, *, required: bool = True, allow_empty: bool = False) -> str:
    value = row.get(key)
    if value is None:
        if required:  # the row's own keys let the console suggest the data.fields mapping
            raise Reject(
                f"missing field {key!r} (the row has: {', '.join(sorted(map(str, row))) or 'nothing'})"
            )
        return ""
    if not isinstance(value, str):
        raise Reject(f"field {key!r} must be a string, got {type(value).__name__}")
    if not value.strip() and not allow_empty:
        raise Reject(f"empty field {key!r}")
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
    raise Reject(
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
            raise Reject(f"field {key!r} is a string but not a JSON list ({exc.msg})") from exc
    if raw is None:
        raise Reject(f"missing field {key!r}")
    if not isinstance(raw, list) or not raw:
        raise Reject(f"field {key!r} must be a non-empty list of messages")
    messages = [_message(msg, f"{key}[{i}]") for i, msg in enumerate(raw)]
    try:
        validate_messages(messages)
    except TemplateError as exc:
        raise Reject(str(exc)) from exc
    if all(m.get("weight") == 0 for m in messages if m["role"] == "assistant"):
        raise Reject("every assistant turn has weight 0: nothing to train")
    return messages


def _message(msg: Any, where: str) -> dict:
    """One chat message: role, content (a string or OpenAI's text parts) and OpenAI's per-turn weight."""
    if not isinstance(msg, dict):
        raise Reject(f"{where} must be an object, got {type(msg).__name__}")
    role = msg.get("role", msg.get("from"))
    if (
        role in ("tool", "function", "function_call", "observation", "ipython")
        or msg.get("tool_calls")
        or msg.get("function_call")
    ):
        raise Reject(
            f"{where} is a tool call or result (role {role!r}): tool use is not trained by these chat "
            "templates; leave such rows out or write the calls into the text"
        )
    content = msg.get("content", msg.get("value"))
    if role is None or content is None:
        raise Reject(f"{where} needs 'role' and 'content'")
    if isinstance(content, list):  # OpenAI's content parts: the text parts, joined as OpenAI joins them
        kinds = {p.get("type") if isinstance(p, dict) else type(p).__name__ for p in content}
        if kinds - {"text"}:
            raise Reject(
                f"{where}.content has {', '.join(sorted(map(str, kinds - {'text'})))} parts: only text trains"
            )
        content = "".join(p.get("text") or "" for p in content)
    if not isinstance(content, str):
        raise Reject(f"{where}.content must be a string, got {type(content).__name__}")
    if not content.strip():
        raise Reject(f"{where}.content is empty")
    out = {"role": ROLE_ALIASES.get(role, role), "content": content.strip()}
    if (
        msg.get("weight") is not None
    ):  # OpenAI: 0 leaves that turn untrained (a table gives None where absent)
        if out["role"] != "assistant" or msg["weight"] not in (0, 1) or isinstance(msg["weight"], bool):
            raise Reject(f"{where}.weight is {msg['weight']!r}: only assistant turns take a weight, 0 or 1")
        out["weight"] = msg["weight"]
    return out


def normalize_record(
    row: Any, position: int, format: str = "auto", fields: dict[str, str] | None = None
) -> Example:
    """Normalize one raw record; raises Reject with a specific reason for unusable rows.

    `fields` maps our field names to the dataset's own (data.fields, e.g. {"output": "response"})."""
    if isinstance(row, Reject):
        raise row
    if not isinstance(row, dict):
        raise Reject(f"expected a JSON object, got {type(row).__name__}")
    if fields:
        row = {k: v for k, v in row.items() if k not in fields.values()} | {
            ours: row[theirs] for ours, theirs in fields.items() if theirs in row
        }
    shape = _detect_shape(row) if format == "auto" else format
    if shape == "text":
        text = row.get("text")
        if not isinstance(text, str) or not text.strip():
            raise Reject(
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
    fields: dict[str, str] | None = None,
    is_online: Callable[[], bool] = hub_reachable,
    hub_loader: Callable[[str, str], Any] = load_hub,
) -> LoadResult:
    """Read and normalize every record; raise DatasetError when no row is usable."""
    fmt = FORMAT_ALIASES.get(format, format)
    if fmt not in FORMATS:
        raise DatasetError(f"unknown dataset format {format!r}; valid: {', '.join(FORMATS)}")
    source = os.fspath(source)
    unit, rows = rows_of(source, split, is_online, hub_loader)
    examples, rejected, read = [], [], 0
    for position, row in rows:
        read += 1
        try:
            examples.append(normalize_record(row, position, fmt, fields))
        except Reject as exc:
            rejected.append(Rejection(position, str(exc), unit))
    if not examples:
        detail = "; ".join(map(str, rejected[:3])) + ("; ..." if len(rejected) > 3 else "")
        why = f"{len(rejected)} rejected: {detail}" if rejected else "no records found"
        raise DatasetError(f"{source}: no usable rows ({why})")
    return LoadResult(source, examples, rejected, read, unit)
