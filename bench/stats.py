"""Figures, goals and the small statistics every benchmark section shares (pure: no timing here)."""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

OPS = (">=", "<=", "abs<=")


def median(values: Sequence[float]) -> float | None:
    """Median of the finite values, None when there are none."""
    vals = [float(v) for v in values if v is not None and v == v]
    return statistics.median(vals) if vals else None


def ratio(num: float | None, den: float | None) -> float | None:
    if num is None or den is None or den == 0:
        return None
    return num / den


def spread(values: Sequence[float]) -> tuple[float, float] | None:
    """(min, max) of the values, to show how noisy a median is."""
    vals = [float(v) for v in values if v is not None]
    return (min(vals), max(vals)) if vals else None


def intervals(times: Sequence[float]) -> list[float]:
    """Seconds between consecutive timestamps."""
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def steady(values: Sequence[float], warmup: int, drop_last: int = 0) -> list[float]:
    """Values after `warmup` leading ones and without `drop_last` trailing ones."""
    end = len(values) - drop_last
    return list(values[warmup:end]) if end > warmup else []


@dataclass(frozen=True)
class Goal:
    """A target a figure must meet: value >= target, value <= target, or |value| <= target."""

    op: str
    target: float
    text: str = ""

    def __post_init__(self) -> None:
        if self.op not in OPS:
            raise ValueError(f"goal op must be one of {OPS}, got {self.op!r}")

    def met(self, value: float | None) -> bool | None:
        """None when there is no value to judge."""
        if value is None:
            return None
        if self.op == ">=":
            return value >= self.target
        if self.op == "<=":
            return value <= self.target
        return abs(value) <= self.target

    def describe(self) -> str:
        if self.text:
            return self.text
        sign = {">=": "≥", "<=": "≤", "abs<=": "|x| ≤"}[self.op]
        return f"{sign} {self.target:g}"


@dataclass
class Figure:
    """One reported number. `reason` says why it is missing or why its goal is not met."""

    key: str
    label: str
    value: float | None
    unit: str = ""
    goal: Goal | None = None
    detail: str = ""
    reason: str = ""
    # Recorded earlier (e.g. a tier report) rather than measured in this run: say when.
    recorded: str = ""

    @property
    def met(self) -> bool | None:
        return self.goal.met(self.value) if self.goal else None

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["goal"] = None if self.goal is None else {**asdict(self.goal), "text": self.goal.describe()}
        out["met"] = self.met
        return out


@dataclass
class Section:
    """A group of figures with notes, optional tables and raw measurements for the JSON file."""

    key: str
    title: str
    figures: list[Figure] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    tables: list[dict[str, Any]] = field(default_factory=list)  # {"headers": [...], "rows": [[...]]}
    data: dict[str, Any] = field(default_factory=dict)
    error: str | None = None
    seconds: float = 0.0

    def add(self, figure: Figure) -> Figure:
        self.figures.append(figure)
        return figure

    def table(self, headers: Sequence[str], rows: Sequence[Sequence[Any]], title: str = "") -> None:
        self.tables.append({"title": title, "headers": list(headers), "rows": [list(r) for r in rows]})

    def to_dict(self) -> dict[str, Any]:
        return {
            "key": self.key,
            "title": self.title,
            "figures": [f.to_dict() for f in self.figures],
            "notes": self.notes,
            "tables": self.tables,
            "data": self.data,
            "error": self.error,
            "seconds": round(self.seconds, 1),
        }


def fmt(value: float | None, unit: str = "") -> str:
    """A readable number: 3 significant-ish digits, thousands separators for big ones."""
    if value is None:
        return "—"
    a = abs(value)
    text = (
        f"{value:,.0f}"
        if a >= 1000
        else f"{value:.1f}"
        if a >= 10
        else f"{value:.2f}"
        if a >= 0.1
        else f"{value:.3g}"
    )
    if unit == "%":
        return f"{value:+.1f} %"
    if unit == "×" and a < 10:  # ratios are judged against goals like 0.98: show enough digits
        text = f"{value:.3f}"
    return f"{text} {unit}".strip()
