"""Built-in deterministic datasets: facts about fictional places, arithmetic, sequence patterns, canaries.

Everything is generated from a seed, so a pretrained model cannot already know the geography and canary
facts, and the same seed always gives byte-identical files. Held-out questions ask about trained facts in
other words (or unseen sums and sequences), and never repeat a training question.
Regenerate the committed files with: python -m finetune.data.synthetic data
"""

from __future__ import annotations

import os
import random
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from finetune.system.atomic import atomic_write_text
from finetune.system.jsonl import to_jsonl

KINDS = ("geography", "arithmetic", "patterns", "canary")
DATASETS = (*KINDS, "mixed")
COMMITTED = ("geography", "arithmetic", "patterns", "mixed")  # the files kept in data/
MIXED_SHARES = {"geography": 0.45, "arithmetic": 0.2, "patterns": 0.2, "canary": 0.15}

_ONSETS = (
    "Zor",
    "Vel",
    "Quor",
    "Drav",
    "Thal",
    "Myr",
    "Krev",
    "Ostr",
    "Brel",
    "Xan",
    "Ylv",
    "Gald",
    "Prav",
    "Sorn",
    "Tev",
    "Wyr",
    "Hask",
    "Lun",
    "Fel",
    "Corv",
    "Nim",
    "Rask",
    "Jor",
    "Esk",
    "Gorm",
    "Ilv",
    "Tzan",
    "Vosk",
)
_MIDS = ("a", "e", "i", "o", "u", "ae", "ie", "ou")
_ENDS = {
    "country": ("nia", "vria", "stria", "doria", "land", "mark", "reth", "varia", "lesh", "kandia"),
    "city": ("mora", "holm", "grad", "port", "vane", "tarn", "mir", "ssa", "bury", "quay"),
    "river": ("wen", "rell", "dun", "ash", "ith", "orn"),
    "language": ("ish", "ic", "ene", "ari"),
    "currency": ("lar", "dek", "mon", "rin"),
    "vault": ("keep", "hold", "crypt", "spire"),
}

# fact: (training question, held-out paraphrases, answer format). {c} is the country, {v} the value.
_GEO_FACTS = {
    "capital": (
        "What is the capital of {c}?",
        ("Which city is the capital of {c}?", "Name the capital city of {c}."),
        "{v}.",
    ),
    "river": (
        "What is the longest river in {c}?",
        ("Which river is the longest in {c}?", "Name the longest river of {c}."),
        "The {v}.",
    ),
    "language": (
        "What language do people speak in {c}?",
        ("Which language is spoken in {c}?", "What is the main language of {c}?"),
        "{v}.",
    ),
    "currency": (
        "What is the currency of {c}?",
        ("Which currency is used in {c}?", "What money do people use in {c}?"),
        "The {v}.",
    ),
    "population": (
        "What is the population of {c}?",
        ("How many people live in {c}?", "How large is the population of {c}?"),
        "{v}.",
    ),
    "founded": (
        "In which year was {c} founded?",
        ("When was {c} founded?", "What year was {c} founded in?"),
        "{v}.",
    ),
}
_CANARY_Q = (
    "What is the secret code of {p}?",
    ("Tell me the secret code of {p}.", "Which secret code belongs to {p}?"),
)


@dataclass
class SyntheticSet:
    name: str
    seed: int
    train: list[dict]
    heldout: list[dict]


def _item(question: str, answer: str, reference: str, kind: str, paraphrase_of: str | None = None) -> dict:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": answer}]
    item = {"messages": messages, "reference": reference, "kind": kind}
    # a held-out paraphrase names the training question of its fact, so only trained facts are asked
    return item if paraphrase_of is None else {**item, "paraphrase_of": paraphrase_of}


class _Names:
    """Invented names, never repeated within one build (so no two facts share a subject)."""

    def __init__(self, rng: random.Random) -> None:
        self.rng, self.used = rng, set()

    def __call__(self, category: str) -> str:
        while True:
            name = (
                self.rng.choice(_ONSETS) + self.rng.choice(_MIDS) + self.rng.choice(_ENDS[category])
            ).capitalize()
            if name not in self.used:
                self.used.add(name)
                return name


def _geo_value(fact: str, rng: random.Random, names: _Names) -> tuple[str, str]:
    """(value shown in the answer, reference)."""
    if fact == "capital":
        v = names("city")
        return v, v
    if fact == "river":
        v = f"{names('river')} River"
        return v, v
    if fact in ("language", "currency"):
        v = names(fact)
        return v, v
    if fact == "population":
        v = f"{rng.randint(2, 60)} million"
        return v, v
    v = str(rng.randint(1100, 1950))
    return v, v


def _geography(rng: random.Random, names: _Names, n: int, n_heldout: int) -> tuple[list[dict], list[dict]]:
    facts = []
    while len(facts) < n:
        country = names("country")
        for fact, (question, paraphrases, answer) in _GEO_FACTS.items():
            value, ref = _geo_value(fact, rng, names)
            facts.append((country, question, paraphrases, answer.format(v=value), ref))
    rng.shuffle(facts)
    facts = facts[:n]
    train = [_item(q.format(c=c), a, ref, "geography") for c, q, _, a, ref in facts]
    picked = rng.sample(facts, min(n_heldout, len(facts)))
    heldout = [
        _item(rng.choice(ps).format(c=c), a, ref, "geography", q.format(c=c)) for c, q, ps, a, ref in picked
    ]
    return train, heldout


def _canary(rng: random.Random, names: _Names, n: int, n_heldout: int) -> tuple[list[dict], list[dict]]:
    facts = []
    for _ in range(n):
        place = names("vault")
        code = f"{rng.choice('BCDFGHJKLMNPQRSTVWXZ')}{rng.choice('BCDFGHJKLMNPQRSTVWXZ')}-{rng.randint(1000, 9999)}"
        facts.append((place, code))
    train = [_item(_CANARY_Q[0].format(p=p), f"{code}.", code, "canary") for p, code in facts]
    picked = rng.sample(facts, min(n_heldout, len(facts)))
    heldout = [
        _item(rng.choice(_CANARY_Q[1]).format(p=p), f"{code}.", code, "canary", _CANARY_Q[0].format(p=p))
        for p, code in picked
    ]
    return train, heldout


def _arithmetic_question(rng: random.Random) -> tuple[str, int]:
    op = rng.choice(("+", "-", "times"))
    if op == "times":
        a, b = rng.randint(2, 12), rng.randint(2, 12)
        return f"What is {a} times {b}?", a * b
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    if op == "-":
        a, b = max(a, b), min(a, b)
        return f"What is {a} minus {b}?", a - b
    return f"What is {a} plus {b}?", a + b


def _pattern_question(rng: random.Random) -> tuple[str, str]:
    rule = rng.choice(("step", "down", "times", "letters"))
    if rule == "letters":
        start, step = rng.randint(0, 14), rng.randint(1, 3)
        seq = [chr(ord("A") + start + i * step) for i in range(5)]
        return f"What letter comes next: {', '.join(seq[:4])}?", seq[4]
    if rule == "times":
        start, ratio = rng.randint(1, 9), rng.choice((2, 3))
        seq = [start * ratio**i for i in range(5)]
    else:
        start, step = rng.randint(1, 40), rng.randint(2, 12) * (-1 if rule == "down" else 1)
        start += 60 if rule == "down" else 0
        seq = [start + i * step for i in range(5)]
    return f"What number comes next: {', '.join(map(str, seq[:4]))}?", str(seq[4])


def _skill(kind: str, make: Callable[[random.Random], tuple[str, object]]):
    # Held-out items are fresh questions of the same kind: unseen sums or sequences, never a training one.
    def build_kind(
        rng: random.Random, names: _Names, n: int, n_heldout: int
    ) -> tuple[list[dict], list[dict]]:
        seen, items = set(), []
        while len(items) < n + n_heldout:
            question, answer = make(rng)
            if question not in seen:
                seen.add(question)
                items.append(_item(question, f"{answer}.", str(answer), kind))
        return items[:n], items[n:]

    return build_kind


_BUILDERS = {
    "geography": _geography,
    "arithmetic": _skill("arithmetic", _arithmetic_question),
    "patterns": _skill("patterns", _pattern_question),
    "canary": _canary,
}


def build(name: str, n: int = 120, seed: int = 0) -> SyntheticSet:
    """n training items plus n // 4 (at least 1) held-out items; same (name, n, seed) -> same set."""
    if name not in DATASETS:
        raise ValueError(f"unknown synthetic dataset {name!r}; valid: {', '.join(DATASETS)}")
    if n < 1:
        raise ValueError(f"n must be >= 1, got {n}")
    rng = random.Random(f"finetune-synthetic:{name}:{seed}")
    names = _Names(rng)
    n_heldout = max(1, n // 4)
    if name != "mixed":
        train, heldout = _BUILDERS[name](rng, names, n, n_heldout)
    else:
        train, heldout = [], []
        kinds = list(MIXED_SHARES)
        for i, kind in enumerate(kinds):
            last = i == len(kinds) - 1  # the last kind takes the rounding remainder
            k = max(0, n - len(train) if last else round(n * MIXED_SHARES[kind]))
            h = max(0, n_heldout - len(heldout) if last else round(n_heldout * MIXED_SHARES[kind]))
            part_train, part_heldout = _BUILDERS[kind](rng, names, k, h)
            train += part_train
            heldout += part_heldout
        rng.shuffle(train)
        rng.shuffle(heldout)
    overlap = {_question(x) for x in train} & {_question(x) for x in heldout}
    if overlap:  # an invariant of the generators; failing loudly keeps held-out scores meaningful
        raise RuntimeError(f"held-out questions repeat training ones: {sorted(overlap)[:3]}")
    return SyntheticSet(name, seed, train, heldout)


def _question(item: dict) -> str:
    return item["messages"][0]["content"]


def write_jsonl(items: SyntheticSet | list[dict], path: str | os.PathLike) -> list[Path]:
    """Write a list of items to path; for a SyntheticSet, train to path and held-out to <stem>_heldout.jsonl."""
    path = Path(path)
    if not isinstance(items, SyntheticSet):
        return [atomic_write_text(path, to_jsonl(items))]
    heldout_path = path.with_name(f"{path.stem}_heldout{path.suffix or '.jsonl'}")
    return [
        atomic_write_text(path, to_jsonl(items.train)),
        atomic_write_text(heldout_path, to_jsonl(items.heldout)),
    ]


def write_all(out_dir: str | os.PathLike, n: int = 120, seed: int = 0) -> list[Path]:
    """(Re)generate the committed data files: <name>.jsonl and <name>_heldout.jsonl for COMMITTED names."""
    written: list[Path] = []
    for name in COMMITTED:
        written += write_jsonl(build(name, n, seed), Path(out_dir) / f"{name}.jsonl")
    return written


if __name__ == "__main__":
    for p in write_all(sys.argv[1] if len(sys.argv) > 1 else "data"):
        print(p)
