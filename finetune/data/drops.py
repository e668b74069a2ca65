"""What the data stage dropped, said on the console, and the share above which a run stops as bad input.

A user whose rows say `response` instead of `output` used to train on the 2 rows that happened to fit,
exit 0, with the reason only in prepare_report.json. Each class of dropped row is now counted and shown with
its first lines, and more than `data.max_rejected` of the rows read dropped stops the run with the likely fix.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass

from finetune.data.sources import DatasetError

SHOWN_LINES = 5
# our field -> names other tools and datasets use for it (the hint suggests data.fields.<ours>: <theirs>)
FIELD_ALIASES = {
    "output": ("response", "answer", "target", "assistant", "reply", "chosen", "label", "solution"),
    "instruction": ("question", "query", "prompt", "user", "problem", "task"),
    "input": ("context", "source"),
    "prompt": ("question", "query", "instruction", "input", "user", "problem"),
    "completion": ("response", "answer", "output", "target", "assistant", "solution"),
    "text": ("content", "body", "document", "sentence", "passage"),
    "messages": ("conversation", "dialog", "dialogue", "chat", "turns"),
}
MISSING = re.compile(r"missing field '(\w+)'(?: \(the row has: ([^)]*)\))?")
UNRECOGNIZED = re.compile(r"unrecognized record \(keys: ([^)]*)\)")


@dataclass(frozen=True)
class DropClass:
    reason: str  # the reason with its specifics (numbers, positions) taken out
    count: int
    lines: tuple[int, ...]  # the first few
    example: str  # one full reason
    unit: str = "line"

    def describe(self) -> str:
        more = ", ..." if self.count > len(self.lines) else ""
        where = f"{self.unit}{'s' if self.count > 1 else ''} {', '.join(map(str, self.lines))}{more}"
        return f"{self.count} {self.reason} ({where}; e.g. {self.example})"


def _kind(reason: str) -> str:
    return re.sub(r"(?<![\w-])\d+", "N", reason.split(" (")[0]).strip()  # "row has 3 columns", not UTF-8


def classes(report: dict) -> list[DropClass]:
    """Every class of dropped row in a prepare report, largest first: rejections, duplicates, untrained rows."""
    groups: dict[str, list[dict]] = {}
    for r in report.get("rejected") or []:
        groups.setdefault(_kind(r["reason"]), []).append(r)
    out = [
        DropClass(kind, len(rs), tuple(r["line"] for r in rs[:SHOWN_LINES]), rs[0]["reason"], rs[0]["unit"])
        for kind, rs in groups.items()
    ]
    dups = report.get("duplicate_lines") or []
    if report.get("duplicates_removed"):
        n = report["duplicates_removed"]
        out.append(
            DropClass(
                "duplicates removed", n, tuple(dups[:SHOWN_LINES]), "the same rendered text as an earlier row"
            )
        )
    if report.get("rows_without_trained_tokens"):
        n, limit = report["rows_without_trained_tokens"], report.get("max_seq_length")
        out.append(
            DropClass(
                f"rows with no trained token left after truncation to {limit}", n, (), "answer past the limit"
            )
        )
    return sorted(out, key=lambda c: -c.count)


def dropped(report: dict) -> int:
    return sum(c.count for c in classes(report))


def summary(report: dict) -> list[str]:
    """Console lines: rows read and used, then each class of dropped row."""
    counts = report.get("split_counts") or {}
    split = " / ".join(f"{counts[k]} {k}" for k in ("train", "valid", "test") if k in counts)
    lines = [f"{report['rows_read']} rows read from {report['source']}, {report['rows_used']} used ({split})"]
    lines += [f"dropped: {c.describe()}" for c in classes(report)]
    if report.get("truncated_share"):
        lines.append(
            f"{report['truncated_share']:.1%} of rows are cut to max_seq_length {report['max_seq_length']}"
        )
    return lines


def hint(report: dict, fields: Sequence[str] = ()) -> str:
    """The likely fix for the largest class of dropped row, or "" when there is no specific one."""
    for c in classes(report):
        m = MISSING.match(c.example)
        if m:
            has = [k.strip() for k in (m.group(2) or "").split(",") if k.strip()]
            alias = next((k for k in has if k in FIELD_ALIASES.get(m.group(1), ())), None)
            if alias and m.group(1) not in fields:
                return f"rows have {alias!r} where {m.group(1)!r} is expected: set data.fields.{m.group(1)}: {alias}"
            return f"rows lack {m.group(1)!r}; map your column with data.fields.{m.group(1)}: <your column>"
        if m := UNRECOGNIZED.match(c.example):
            has = [k.strip() for k in m.group(1).split(",")]
            pairs = {
                o: next((k for k in has if k in FIELD_ALIASES[o]), None) for o in ("instruction", "output")
            }
            if all(pairs.values()):
                return f"map your columns: data.fields: {{instruction: {pairs['instruction']}, output: {pairs['output']}}}"
            return "map your columns to ours with data.fields (instruction/output, prompt/completion, text or messages)"
        if c.reason.startswith("not valid UTF-8"):
            return "the file is not UTF-8: save it as UTF-8 (e.g. iconv -f latin1 -t utf-8)"
        if c.reason == "duplicates removed":
            return (
                "most rows render to the same text: check data.fields and data.format pick the right columns"
            )
        if c.reason.startswith("rows with no trained token"):
            return "raise data.max_seq_length or shorten the prompts"
    return ""


def check(report: dict, max_rejected: float, fields: Sequence[str] = ()) -> None:
    """Raise DatasetError when more than max_rejected of the rows read were dropped."""
    read, n = report["rows_read"], dropped(report)
    if read and n / read > max_rejected:
        fix = hint(report, fields)
        raise DatasetError(
            f"{report['source']}: {n} of {read} rows ({n / read:.0%}) dropped, more than data.max_rejected "
            f"{max_rejected:.0%}: "
            + "; ".join(c.describe() for c in classes(report)[:3])
            + (f". Likely fix: {fix}" if fix else "")
            + ". Raise data.max_rejected to train on what is left"
        )
