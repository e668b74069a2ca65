"""Where dataset rows come from: JSONL/JSON/CSV/Parquet/Arrow files, folders saved with save_to_disk, the Hub.

Each reader yields (1-based position, row or Reject); bad rows become Reject values instead of aborting.
"""

from __future__ import annotations

import csv
import json
import os
import re
import socket
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from finetune.errors import UserError

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".parquet", ".arrow")


class DatasetError(UserError):
    """A dataset cannot be used; the message names the file and, where there is one, the line."""


class DatasetNotFoundError(DatasetError, FileNotFoundError):
    pass


class Reject(Exception):  # noqa: N818 - a row verdict, not an error of the load
    """One row cannot be used; str() is the reason."""


def hub_reachable() -> bool:
    if os.environ.get("HF_HUB_OFFLINE") == "1" or os.environ.get("HF_DATASETS_OFFLINE") == "1":
        return False
    try:
        socket.create_connection(("huggingface.co", 443), timeout=3).close()
        return True
    except OSError:
        return False


def load_hub(repo_id: str, split: str) -> Any:
    import datasets

    return datasets.load_dataset(repo_id, split=split)


def _jsonl_rows(path: Path) -> Iterator[tuple[int, Any]]:
    with path.open("rb") as fh:
        head = fh.read(64).lstrip()
    if head.startswith(b"[") and not head.startswith(b"[]"):  # a JSON array would fail on every line
        raise DatasetError(
            f"{path}: starts with '[': this looks like a JSON array, not JSON Lines (one object per line); "
            f"rename it to {path.with_suffix('.json').name}"
        )
    with path.open("rb") as fh:
        for lineno, raw in enumerate(fh, start=1):
            try:
                line = raw.decode("utf-8").strip()
            except UnicodeDecodeError as exc:
                yield lineno, Reject(f"not valid UTF-8 ({exc.reason} at byte {exc.start})")
                continue
            if not line:
                continue
            try:
                yield lineno, json.loads(line)
            except json.JSONDecodeError as exc:
                yield lineno, Reject(f"invalid JSON ({exc.msg} at column {exc.colno})")


def _json_rows(path: Path) -> Iterator[tuple[int, Any]]:
    data = path.read_bytes()
    try:
        doc = json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, data, exc) from None
    except json.JSONDecodeError as exc:
        lines = "one object per line: rename it to .jsonl" if exc.msg == "Extra data" else ""
        raise DatasetError(
            f"{path}: invalid JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
            + (f"; this looks like JSON Lines ({lines})" if lines else "")
        ) from exc
    if isinstance(doc, dict) and isinstance(doc.get("data"), list):
        doc = doc["data"]
    if not isinstance(doc, list):
        raise DatasetError(f"{path}: expected a JSON array of records or an object with a 'data' array")
    yield from enumerate(doc, start=1)


def _not_utf8(path: Path, data: bytes, exc: UnicodeDecodeError) -> DatasetError:
    line = data[: exc.start].count(b"\n") + 1
    return DatasetError(
        f"{path}: line {line}: not valid UTF-8 (byte {data[exc.start]:#04x} at byte {exc.start}); the file "
        "is probably Latin-1 or Windows-1252: save it as UTF-8 (e.g. iconv -f cp1252 -t utf-8)"
    )


def _csv_rows(path: Path) -> Iterator[tuple[int, Any]]:
    data = path.read_bytes()
    try:  # decoded whole: a text stream fails on its first 8 KiB block and blames the header, with no line
        data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise _not_utf8(path, data, exc) from None
    with path.open(encoding="utf-8-sig", newline="") as fh:
        reader = csv.reader(fh)
        try:
            header = next(reader)
        except StopIteration:
            return
        except (csv.Error, UnicodeDecodeError) as exc:
            raise DatasetError(f"{path}: cannot read the CSV header: {exc}") from exc
        start = reader.line_num + 1
        while True:
            try:
                cells = next(reader)
            except StopIteration:
                return
            except (csv.Error, UnicodeDecodeError) as exc:
                raise DatasetError(f"{path}: line {start}: unreadable CSV: {exc}") from exc
            if any(c.strip() for c in cells):
                if len(cells) != len(header):
                    yield start, Reject(f"row has {len(cells)} columns, the header has {len(header)}")
                else:
                    yield start, dict(zip(header, cells, strict=True))
            start = reader.line_num + 1


def _table_rows(table: Any) -> Iterator[tuple[int, Any]]:
    yield from enumerate(table, start=1)


def _open_saved(path: Path, split: str) -> Any:
    import datasets

    loaded = datasets.load_from_disk(str(path))
    if isinstance(loaded, datasets.DatasetDict):
        if split not in loaded:
            raise DatasetError(f"{path}: saved dataset has no split {split!r} (splits: {', '.join(loaded)})")
        return loaded[split]
    return loaded


# our split -> the names a dataset may give it
GIVEN_SPLITS = {"train": ("train",), "valid": ("validation", "valid", "val", "dev"), "test": ("test",)}


def given_splits(source: str | os.PathLike) -> dict[str, str]:
    """A saved DatasetDict's own splits as {ours: theirs} when it has train and valid or test, else {}."""
    index = Path(source).expanduser() / "dataset_dict.json"
    if not index.is_file():
        return {}
    names = json.loads(index.read_text()).get("splits") or []
    found = {ours: next((n for n in theirs if n in names), None) for ours, theirs in GIVEN_SPLITS.items()}
    found = {k: v for k, v in found.items() if v}
    return found if "train" in found and len(found) > 1 else {}


def rows_of(
    source: str, split: str, is_online: Callable[[], bool], hub_loader: Callable
) -> tuple[str, Iterator]:
    """(unit, iterator of (position, row or Reject)) for a local file, saved dataset, or Hub id."""
    path = Path(source).expanduser()
    hub_id = re.sub(r"^hf:(//)?(datasets/)?", "", source) if source.startswith("hf:") else None
    if hub_id is None and path.is_dir():
        if not any((path / f).exists() for f in ("dataset_info.json", "dataset_dict.json", "state.json")):
            raise DatasetError(
                f"{path}: a folder, but not one saved with datasets' save_to_disk; pass a .jsonl/.json/.csv file"
            )
        return "row", _table_rows(_open_saved(path, split))
    if hub_id is None and path.is_file():
        suffix = path.suffix.lower()
        if suffix == ".jsonl":
            return "line", _jsonl_rows(path)
        if suffix == ".json":
            return "item", _json_rows(path)
        if suffix == ".csv":
            return "line", _csv_rows(path)
        if suffix in (".parquet", ".arrow"):
            import datasets

            kind = suffix[1:]
            return "row", _table_rows(datasets.load_dataset(kind, data_files=str(path), split="train"))
        raise DatasetError(
            f"{path}: unsupported file type {suffix!r}; use one of {', '.join(LOCAL_SUFFIXES)}"
        )
    looks_like_hub = hub_id is not None or re.fullmatch(r"[\w.-]+/[\w.-]+", source) and not path.suffix
    if not looks_like_hub:
        raise DatasetNotFoundError(f"{source}: dataset file not found")
    hub_id = hub_id or source
    if not is_online():
        raise DatasetNotFoundError(
            f"{source!r} is not a local file or folder and the Hugging Face Hub is unreachable (no network). "
            "Use a local path: a .jsonl, .json, .csv or .parquet file, or a folder saved with save_to_disk."
        )
    return "row", _table_rows(hub_loader(hub_id, split))
