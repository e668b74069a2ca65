"""Measurements behind a training run's gates, made from what the run saved on disk.

  learning   training questions answered by the base and by base + SAVED adapter, teacher-forced loss of both
  artifacts  run files present and parseable, the saved adapter loads, its answers vs the in-memory model's
  params     the saved adapter vs its saved step-0 state, base model files vs their recorded sha256
  mask       the tokens that carried loss in the recorded training rows, decoded, vs the answers

The in-memory answers are recorded by record_in_memory() while training's model is still loaded.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from finetune.evaluate import decode
from finetune.evaluate.general_text import GENERAL_TEXTS
from finetune.gates.label_mask import MaskedRow
from finetune.models.cache import cache_root
from finetune.system.atomic import atomic_write_json
from finetune.system.hashing import dir_manifest, file_sha256, json_sha256, mlx_measurement_versions
from finetune.system.jsonl import read_jsonl
from finetune.train.checkpoints import ADAPTER_CONFIG, ADAPTER_DIR, ADAPTER_FILE, INIT_DIR
from finetune.train.metrics import METRICS, read_metrics

PROBES = "probes"
JUDGED = "judge"  # the learning measurement of the saved adapter, by content (measure_learning)
IN_MEMORY = "in_memory.json"
REQUIRED = (
    "config.yaml",
    METRICS,
    f"{ADAPTER_DIR}/{ADAPTER_FILE}",
    f"{ADAPTER_DIR}/{ADAPTER_CONFIG}",
    f"{INIT_DIR}/{ADAPTER_FILE}",
)
BASE_FILES = ("config.json", "*.safetensors", "tokenizer.json", "tokenizer_config.json", "tokenizer.model")


@dataclass(frozen=True)
class Probe:
    prompt: str  # rendered with the training template, ready for the answer
    reference: str


def probe_questions(data_dir: Path, n: int) -> list[Probe]:
    """The first n training rows that are conversations: questions whose answers the run was taught. Plain
    text rows (no prompt) fill what is left as continuations: their first half, then the rest to complete."""
    rows = read_jsonl(Path(data_dir) / "train.jsonl")
    probes = [Probe(r["prompt"], r["reference"]) for r in rows if r.get("prompt")]
    for r in rows:
        if len(probes) >= n:
            break
        text = r["text"].strip() if not r.get("prompt") else ""
        cut = text.rfind(" ", 0, len(text) // 2 + 1)
        if cut > 0:  # the space starts the continuation, as the tokenizer splits it
            probes.append(Probe(text[:cut], text[cut:]))
    return probes[:n]


def base_file_digests(model_dir: Path) -> dict[str, str]:
    files = sorted({p for pattern in BASE_FILES for p in Path(model_dir).glob(pattern) if p.is_file()})
    return {p.name: file_sha256(p) for p in files}


# ---------------------------------------------------------------- answers


@dataclass
class record_in_memory:  # noqa: N801 - an on_trained hook, a class so a local rank can receive it pickled
    """An on_trained hook: the trained in-memory model's answers, written to RUN/probes/in_memory.json."""

    run_dir: Path
    probes: Sequence[Probe]
    stops: Sequence[str]
    max_tokens: int

    def __call__(self, model: Any, tokenizer: Any) -> None:
        prompts = [p.prompt for p in self.probes]
        answers = decode.greedy(model, tokenizer, prompts, max_tokens=self.max_tokens, stops=self.stops)
        atomic_write_json(Path(self.run_dir) / PROBES / IN_MEMORY, {"answers": [a.text for a in answers]})


def in_memory_answers(run_dir: Path) -> list[str] | None:
    path = Path(run_dir) / PROBES / IN_MEMORY
    try:
        return list(json.loads(path.read_text())["answers"])
    except (OSError, ValueError, KeyError):
        return None


@dataclass
class LearningMeasurement:
    before: list[str]
    after: list[str]
    references: list[str]
    loss_before: float
    loss_after: float
    # mean NLL per token on finetune.evaluate.general_text (no run trains on it), base and base + adapter
    general_before: float | None = None
    general_after: float | None = None


def _answers_and_loss(
    model_dir: Path,
    adapter_dir: Path | None,
    probes: Sequence[Probe],
    data_dir: Path,
    cfg: Any,
    stops: Sequence[str],
    max_tokens: int,
) -> tuple[list[str], float, float]:
    from finetune.train.splits import load_split

    model, tokenizer = decode.load(model_dir, adapter_dir)
    try:
        answers = decode.greedy(
            model, tokenizer, [p.prompt for p in probes], max_tokens=max_tokens, stops=stops
        )
        questions = load_split(Path(data_dir) / "train.jsonl", tokenizer, cfg.data.max_seq_length, True)
        questions.items, questions.rows = questions.items[: len(probes)], questions.rows[: len(probes)]
        loss = decode.teacher_forced_loss(model, questions, cfg.training.batch_size, cfg.data.max_seq_length)
        return [a.text for a in answers], loss, decode.text_nll(model, tokenizer, GENERAL_TEXTS)
    finally:
        decode.release(model)


def _kept(
    path: Path, measure: Callable[[], tuple[list[str], float, float]]
) -> tuple[list[str], float, float]:
    """measure()'s answers, teacher-forced loss and general-text NLL, or what it gave before under this key."""
    try:
        kept = json.loads(path.read_text())
        return kept["answers"], kept["loss"], kept["general"]
    except (OSError, ValueError, KeyError):
        answers, loss, general = measure()
        atomic_write_json(path, {"answers": answers, "loss": loss, "general": general})
        return answers, loss, general


def _setup(run_dir: Path, base_dir: Path, cfg: Any, stops: Sequence[str], max_tokens: int) -> tuple:
    """(data folder, probes, what a learning measurement depends on besides the adapter: its cache key)."""
    data_dir = Path(run_dir) / "data"
    probes = probe_questions(data_dir, cfg.gates.learning_probes)
    settings = {
        "base": base_file_digests(base_dir),
        "probes": [asdict(p) for p in probes],
        "stops": list(stops),
        "max_tokens": max_tokens,
        "seq": cfg.data.max_seq_length,
        "batch": cfg.training.batch_size,
        "general": json_sha256(list(GENERAL_TEXTS)),
        **mlx_measurement_versions(),
        "v": 3,
    }
    return data_dir, probes, settings


def base_learning(
    run_dir: Path,
    base_dir: Path,
    cfg: Any,
    stops: Sequence[str],
    *,
    max_tokens: int,
    cache_dir: Path | None = None,
    setup: tuple | None = None,
) -> tuple[list[str], float, float]:
    """The base model's answers, teacher-forced loss and general-text NLL, cached per (base files, probes,
    settings, code): the base never changes between runs, and nothing here depends on the adapter, so
    finetune.evaluate.base_prefetch measures it while the run trains. setup: _setup's, when made already."""
    data_dir, probes, settings = setup or _setup(run_dir, base_dir, cfg, stops, max_tokens)
    cache = (cache_dir or cache_root() / "base-answers") / f"{json_sha256(settings)[:32]}.json"
    return _kept(cache, lambda: _answers_and_loss(base_dir, None, probes, data_dir, cfg, stops, max_tokens))


def measure_learning(
    run_dir: Path,
    base_dir: Path,
    cfg: Any,
    stops: Sequence[str],
    *,
    max_tokens: int,
    cache_dir: Path | None = None,
    base_ready: Callable[[], None] = lambda: None,
) -> LearningMeasurement:
    """The saved adapter's answers, kept in the run per the same settings and its files' content, then the
    base's (base_learning), once base_ready() returns: it waits for the base measured beside training."""
    setup = data_dir, probes, settings = _setup(run_dir, base_dir, cfg, stops, max_tokens)
    # the saved adapter's, kept in the run by its files' content: a pipeline after a run judges the same bytes.
    # In the judge's own folder: training's probes/ is a finished stage's artifact, never written after it.
    adapter_dir = Path(run_dir) / ADAPTER_DIR
    key = settings | {"adapter": dir_manifest(adapter_dir)}
    kept = Path(run_dir) / JUDGED / f"saved-adapter-{json_sha256(key)[:32]}.json"
    after, loss_after, general_after = _kept(
        kept, lambda: _answers_and_loss(base_dir, adapter_dir, probes, data_dir, cfg, stops, max_tokens)
    )
    base_ready()
    before, loss_before, general_before = base_learning(
        run_dir, base_dir, cfg, stops, max_tokens=max_tokens, cache_dir=cache_dir, setup=setup
    )
    references = [p.reference for p in probes]
    return LearningMeasurement(
        before, after, references, loss_before, loss_after, general_before, general_after
    )


# ---------------------------------------------------------------- artifacts and parameters


def artifact_problems(run_dir: Path) -> list[str]:
    """Missing or unparseable run files; the adapter's loadability is tested by loading it (measure_learning)."""
    from finetune.models.safetensors import SafetensorsError, read_header

    run_dir = Path(run_dir)
    problems = [f"missing {rel}" for rel in REQUIRED if not (run_dir / rel).is_file()]
    if not list((run_dir / "checkpoints").glob("step-*")):
        problems.append("no checkpoint under checkpoints/")
    cfg_file = run_dir / ADAPTER_DIR / ADAPTER_CONFIG
    if cfg_file.is_file():
        try:
            json.loads(cfg_file.read_text())
        except ValueError as exc:
            problems.append(f"{ADAPTER_DIR}/{ADAPTER_CONFIG} is not valid JSON ({exc})")
    for rel in (f"{ADAPTER_DIR}/{ADAPTER_FILE}", f"{INIT_DIR}/{ADAPTER_FILE}"):
        if (run_dir / rel).is_file():
            try:
                read_header(run_dir / rel)
            except SafetensorsError as exc:
                problems.append(str(exc))
    if (run_dir / METRICS).is_file() and not read_metrics(run_dir / METRICS):
        problems.append(f"{METRICS} has no rows")
    return problems


def adapter_tensors(folder: Path) -> dict[str, np.ndarray]:
    from finetune.models.safetensors import load_file

    return load_file(Path(folder) / ADAPTER_FILE)


# ---------------------------------------------------------------- label mask


def masked_rows(run_dir: Path, tokenizer: Any, max_seq_length: int) -> list[MaskedRow]:
    """Decode the loss-carrying runs of the rows training recorded (train/engine.record_tokens)."""
    from finetune.train.splits import TOKENS

    recorded = json.loads((Path(run_dir) / TOKENS).read_text())
    rows = read_jsonl(Path(run_dir) / "data" / "train.jsonl")
    out = []
    for rec in recorded["rows"]:
        ids, mask = rec["ids"], rec["mask"]
        runs, current = [], []
        for i, (t, m) in enumerate(zip(ids, mask, strict=True)):
            if m and i > 0:  # position 0 is never a target
                current.append(t)
            elif current:
                runs.append(current)
                current = []
        if current:
            runs.append(current)
        messages = rows[rec["row"]].get("conversation") or []
        answers = [m["content"] for m in messages if m["role"] == "assistant" and m.get("weight", 1)]
        decoded = [tokenizer.decode(r) for r in runs]
        truncated = len(ids) >= max_seq_length
        out.append(MaskedRow(rec["row"], decoded, answers, len(ids), sum(mask[1:]), truncated))
    return out
