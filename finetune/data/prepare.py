"""Preparing a dataset for training: render with a chat template, dedupe, shuffle with a seed, split into
train/valid/test.jsonl, and report what was used, rejected and truncated (prepare_report.json).
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

from finetune import faults
from finetune.data import drops
from finetune.data.records import Example, LoadResult, Rejection, load_records
from finetune.data.sources import DatasetError, given_splits
from finetune.data.templates import Template, TemplateError, check_special_tokens, get_template
from finetune.data.tokens import measure_lengths
from finetune.system.atomic import atomic_write_text
from finetune.system.jsonl import read_jsonl, to_jsonl

SPLIT_NAMES = ("train", "valid", "test")
MAX_LISTED = 20  # cap on line numbers listed in reports and error messages


# ---------------------------------------------------------------- preparing splits


REPORT_NAME = "prepare_report.json"


@dataclass
class PrepareReport:
    source: str  # relative to the report's folder when it lies inside it (a built-in set)
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
    trained_tokens: dict[str, float] | None = None
    notes: list[str] = field(default_factory=list)
    files: dict[str, str] = field(default_factory=dict)  # relative to the report's folder, which may move

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
    if example.messages is not None:  # evaluation asks runtimes that render their own template (Ollama)
        row["conversation"] = example.messages
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
    fields: dict[str, str] | None = None,
    load: Callable[..., LoadResult] = load_records,
) -> PrepareReport:
    """Load, render, dedupe, shuffle and split into out_dir/{train,valid,test}.jsonl + prepare_report.json."""
    tmpl = template if isinstance(template, Template) else get_template(template, tokenizer)
    given = given_splits(source)
    if given:  # a DatasetDict's own splits are used as given, not pooled and cut again
        loaded, rows, rejected, dup_lines, counts = _given(
            source, given, format, fields, load, tmpl, mask_prompt, splits, seed
        )
    else:
        loaded = load(source, format, fields=fields) if fields else load(source, format)
        rows, rejected, dup_lines = _render_unique(loaded, tmpl, mask_prompt)
        counts = split_counts(len(rows), splits)
        random.Random(seed).shuffle(rows)
    out = Path(out_dir)
    files = _write_splits(rows, counts, out)
    lengths = measure_lengths([r for _, r in rows], tokenizer, max_seq_length, mask_prompt)
    notes = list(lengths.notes)
    if any(ex.text is not None for ex, _ in rows):
        notes.append("text-shape rows are trained whole and have no prompt/reference for evaluation")

    source = Path(loaded.source)
    report = PrepareReport(
        source=source.relative_to(out).as_posix() if source.is_relative_to(out) else loaded.source,
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
        length_unit=lengths.unit,
        length_stats=_stats(lengths.lengths),
        truncated_share=lengths.truncated_share,
        rows_without_trained_tokens=lengths.untrained,
        trained_tokens=lengths.trained_tokens,
        notes=notes,
        files=files,
    )
    report.files["report"] = REPORT_NAME
    write_report(report, out)
    return report


def write_report(report: PrepareReport, out: Path) -> None:
    atomic_write_text(out / REPORT_NAME, json.dumps(report.to_dict(), indent=2, ensure_ascii=False) + "\n")


def _render_unique(
    loaded: LoadResult, tmpl: Template, mask_prompt: bool
) -> tuple[list[tuple[Example, dict]], list[Rejection], list[int]]:
    """Rendered rows with their examples, first occurrence of each text kept; rejections; duplicate lines."""
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
    return rows, rejected, dup_lines


def _given(source, given, format, fields, load, tmpl, mask_prompt, splits, seed):
    """Each given split loaded and rendered on its own; a valid/test row that is a train row is dropped as a
    duplicate (a leak), and a split the dataset lacks is cut from train by data.splits."""
    parts, rejected, dup_lines, read, seen = {}, [], [], 0, set()
    for ours, theirs in given.items():
        loaded = load(source, format, split=theirs, **({"fields": fields} if fields else {}))
        loaded.rejected = [Rejection(r.line, r.reason, f"{theirs} row") for r in loaded.rejected]
        loaded.unit = f"{theirs} row"
        kept, bad, dups = _render_unique(loaded, tmpl, mask_prompt)
        leaks = [ex.line for ex, row in kept if row["text"] in seen]
        parts[ours] = [(ex, row) for ex, row in kept if row["text"] not in seen]
        seen |= {row["text"] for _, row in parts[ours]}
        dup_lines += dups + leaks
        rejected, read = rejected + bad, read + loaded.rows_read
    train = parts["train"]
    random.Random(seed).shuffle(train)
    for name, share in (("valid", splits[1]), ("test", splits[2])):
        if name not in parts:
            n = max(1, round(len(train) * share / (splits[0] + share)))
            parts[name], train = train[:n], train[n:]
    if not train or not parts["valid"] or not parts["test"]:
        raise DatasetError(
            f"{source}: the given splits leave {len(train)} train, {len(parts['valid'])} valid, {len(parts['test'])} test rows: each needs at least 1"
        )
    counts = {"train": len(train), "valid": len(parts["valid"]), "test": len(parts["test"])}
    summary = LoadResult(str(source), [], rejected, read, "row")
    return summary, train + parts["valid"] + parts["test"], rejected, sorted(dup_lines), counts


def _write_splits(rows: list[tuple[Example, dict]], counts: dict[str, int], out: Path) -> dict[str, str]:
    """Consecutive chunks of the shuffled rows, one file per split; returns the file names."""
    out.mkdir(parents=True, exist_ok=True)
    rows = faults.point("split_leak", rows, counts)
    files, start = {}, 0
    for name in SPLIT_NAMES:
        chunk = rows[start : start + counts[name]]
        start += counts[name]
        path = out / f"{name}.jsonl"
        atomic_write_text(path, to_jsonl([r for _, r in chunk]))
        files[name] = path.name
    return files


BUILTIN = "builtin:"


def materialize_source(source: str, out_dir: Path, *, num_examples: int, seed: int) -> str:
    """A `builtin:<name>` source becomes source.jsonl (plus heldout.jsonl, its unseen paraphrases) in out_dir."""
    if not source.startswith(BUILTIN):
        return source
    from finetune.data import synthetic

    out_dir.mkdir(parents=True, exist_ok=True)
    built = synthetic.build(source[len(BUILTIN) :], n=num_examples, seed=seed)
    built = faults.point("questions_as_ids", built)
    synthetic.write_jsonl(built.train, out_dir / "source.jsonl")
    synthetic.write_jsonl(built.heldout, out_dir / "heldout.jsonl")
    return str(out_dir / "source.jsonl")


def prepare_for_run(data_cfg: Any, out_dir: Path, tokenizer: Any) -> PrepareReport:
    """prepare() as a run's `data:` section asks (template by name, built-in sources generated first)."""
    template = get_template(data_cfg.template, tokenizer=tokenizer)
    check_special_tokens(template, tokenizer)
    out = Path(out_dir)
    source = materialize_source(data_cfg.source, out, num_examples=data_cfg.num_examples, seed=data_cfg.seed)
    report = prepare(
        source,
        out,
        template=template,
        seed=data_cfg.seed,
        splits=tuple(data_cfg.splits),
        max_seq_length=data_cfg.max_seq_length,
        mask_prompt=data_cfg.mask_prompt,
        tokenizer=tokenizer,
        format=data_cfg.format,
        fields=data_cfg.fields,
    )
    kept, dropped = keep_trained_heldout(out)
    if dropped:
        report.notes.append(
            f"held-out: {dropped} of {kept + dropped} paraphrases ask about facts that landed in valid/test "
            "(never trained) and were left out"
        )
        write_report(report, out)
    drops.check(report.to_dict(), data_cfg.max_rejected, tuple(data_cfg.fields))
    return report


def keep_trained_heldout(out: Path) -> tuple[int, int]:
    """(kept, dropped): heldout.jsonl keeps a paraphrase only when the question it rephrases is a training row;
    rows without `paraphrase_of` (fresh questions of a skill) all stay."""
    path = out / "heldout.jsonl"
    if not path.is_file():
        return 0, 0
    trained = {
        row["conversation"][-2]["content"]
        for row in read_jsonl(out / "train.jsonl")
        if len(row.get("conversation") or []) >= 2
    }
    rows = read_jsonl(path)
    kept = [r for r in rows if r.get("paraphrase_of") is None or r["paraphrase_of"] in trained]
    if len(kept) < len(rows):
        atomic_write_text(path, to_jsonl(kept))
    return len(kept), len(rows) - len(kept)


def read_report(folder: Path) -> dict | None:
    """A prepared folder's prepare_report.json, or None when it is missing or unreadable."""
    try:
        return json.loads((Path(folder) / REPORT_NAME).read_text())
    except (OSError, ValueError):
        return None
