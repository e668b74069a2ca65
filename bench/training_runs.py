"""What the training section records and the pure maths over it (no I/O beyond reading a metrics file).

The settings every tool trains with, one run's step times, losses and memory, parsers of each tool's output
(mlx-lm's report lines, bench/mlx_lm_child.py's markers, FineTune's metrics.jsonl and train_result.json), and
the measures the runners and the summary share: padded batch widths, matmul FLOPs per step, loss targets per
example, per-round ratios. bench/training.py says what is measured and runs the rounds.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.stats import median, steady
from finetune.data.tokens import batch_width

TOOLS = ("finetune", "finetune_off", "mlx_lm", "peft")
LABELS = {
    "finetune": "finetune train, shortcuts on",
    "finetune_off": "finetune train, shortcuts off",
    "mlx_lm": "mlx_lm lora CLI",
    "peft": "transformers + peft (torch CPU)",
}
SETTING_TITLES = {
    "equal": "equal settings (mask_prompt off, loss on every position)",
    "release": "release profile as users run it (mask_prompt on)",
}
SHORTCUTS_OFF = (
    "training.cache_frozen_prefix=false",
    "training.loss_positions_only=false",
    "training.trim_batches=false",
)
# mlx-lm's per-step line: "  iter   train_loss ▼    tok/s    tokens" (the arrow is ▼ or ▲).
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")
MLX_LM_LINE = re.compile(r"^\s*(\d+)\s+(-?[\d.]+|nan)\s+\S\s+([\d,]+)\s+([\d.]+)k\s*$")
MLX_LM_VAL = re.compile(r"^\s*(\d+)\s+val\s+(-?[\d.]+|nan)\s+([\d.]+)s\s*$")
# Lines bench/mlx_lm_child.py adds around the unchanged CLI.
LOOP_START = "BENCH_LOOP_START"
PEAK_LINE = "BENCH_PEAK_MEMORY_BYTES"
PREFIX_NOTE = re.compile(r"prefix computed once in ([\d.]+) s")


@dataclass
class Settings:
    """What every tool trains with in one setting."""

    key: str  # "equal" or "release"
    model: str
    model_path: str
    profile: str
    overrides: list[str]  # the --set values of every finetune run of this setting
    mask_prompt: bool
    batch_size: int
    max_seq_length: int
    rank: int
    scale: float
    dropout: float
    num_layers: int
    keys: list[str] | None
    learning_rate: float
    seed: int
    iters: int
    warmup: int
    rounds: int
    # torch threads for peft; MLX trains with OPENBLAS_NUM_THREADS BLAS threads, so the default matches it.
    peft_threads: int = 1
    profile_iters: int = 0  # the profile's own training.iters (what users run), for the projection


@dataclass
class Run:
    tool: str
    round: int
    setting: str = "equal"
    times: list[float] = field(default_factory=list)  # end of each training step (epoch seconds)
    internal_tps: list[float] = field(default_factory=list)  # the tool's own tokens/s per step, if any
    losses: list[float] = field(default_factory=list)  # per-step training loss
    loop_s: float | None = None  # the training loop's wall time, validation excluded
    one_off_s: float = 0.0  # paid before step 1 for the speed-up (finetune's frozen-prefix cache)
    peak_bytes: int | None = None  # MLX allocator peak (finetune, mlx_lm) or torch's process RSS peak (peft)
    rss_bytes: int | None = None  # the child process's peak RSS (os.wait4), the same for every tool
    wall_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def step_seconds(self, warmup: int) -> list[float]:
        """Durations of steps warmup+1 .. N-1 (step k's duration = t[k] - t[k-1])."""
        durations = [b - a for a, b in zip(self.times, self.times[1:], strict=False)]  # steps 2..N
        return steady(durations, max(0, warmup - 1), drop_last=1)

    def end_to_end_tps(self, tokens_per_step: float) -> float | None:
        """Tokens of every step / (training loop + one-off cost), None when the loop time is unknown."""
        if self.error or not self.loop_s or not self.times:
            return None
        return len(self.times) * tokens_per_step / (self.loop_s + self.one_off_s)


# ---------------------------------------------------------------- parsing (pure)


def parse_mlx_lm_line(line: str) -> tuple[int, float, float] | None:
    """(iteration, train loss, tokens/s) from one of mlx-lm's report lines, else None."""
    m = MLX_LM_LINE.match(ANSI.sub("", line).strip("\r\n"))
    if not m:
        return None
    return int(m.group(1)), float(m.group(2)), float(m.group(3).replace(",", ""))


def parse_mlx_lm_val(line: str) -> float | None:
    """Seconds of one of mlx-lm's validation lines ("   1    val 10.783    0.54s"), else None."""
    m = MLX_LM_VAL.match(ANSI.sub("", line).strip("\r\n"))
    return float(m.group(3)) if m else None


def parse_marker(line: str, name: str) -> float | None:
    """The number after one of bench/mlx_lm_child.py's marker names, else None."""
    text = ANSI.sub("", line).strip()
    if not text.startswith(name + " "):
        return None
    try:
        return float(text.split()[1])
    except (IndexError, ValueError):
        return None


def read_metrics(path: Path) -> dict[str, list[float]]:
    """Train rows of a FineTune metrics.jsonl in step order (times, tokens/s, losses) and every val_time."""
    train, val = [], []
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        if line.strip():
            row = json.loads(line)
            if row.get("kind") == "train":
                train.append(row)
            elif row.get("kind") == "val" and row.get("val_time") is not None:
                val.append(float(row["val_time"]))
    train.sort(key=lambda r: r["step"])
    return {
        "times": [r["time"] for r in train],
        "tps": [r["tokens_per_second"] for r in train],
        "losses": [r["train_loss"] for r in train],
        "val_times": val,
    }


def read_metrics_times(path: Path) -> tuple[list[float], list[float]]:
    """Step-end times and mlx-lm's tokens/s from a FineTune metrics.jsonl (train rows, in step order)."""
    m = read_metrics(path)
    return m["times"], m["tps"]


def prefix_seconds(shortcuts_note: str | None) -> float:
    """The one-off frozen-prefix cost from train_result.json's extra.shortcuts (0 when there is none)."""
    m = PREFIX_NOTE.search(shortcuts_note or "")
    return float(m.group(1)) if m else 0.0


def max_relative_difference(a: list[float], b: list[float]) -> float | None:
    """max |a - b| / |b| over the steps both have (None when they share none)."""
    pairs = list(zip(a, b, strict=False))
    if not pairs:
        return None
    return max(abs(x - y) / max(abs(y), 1e-12) for x, y in pairs)


def batch_widths(lengths: list[int], batch_size: int, max_seq_length: int, extra: int = 0) -> set[int]:
    """Padded widths of every length bucket, as mlx-lm/FineTune pad (1 + a multiple of 32, capped)."""
    order = sorted(lengths)
    widths = set()
    for i in range(0, len(order) - batch_size + 1, batch_size):
        longest = order[i + batch_size - 1] + extra
        widths.add(batch_width(longest, max_seq_length))
    return widths


def step_gflop(model_config: dict[str, Any], batch: int, width: int, adapted_layers: int) -> float:
    """Matmul GFLOP of one LoRA step: forward through every block and the LM head, backward (input gradients
    only, the base is frozen) through the adapted blocks and the head. Adapter and attention-score FLOPs are
    left out (<2% here), so this is a floor (pure)."""
    h, inter = model_config["hidden_size"], model_config["intermediate_size"]
    heads = model_config["num_attention_heads"]
    kv = model_config.get("num_key_value_heads", heads)
    head_dim = model_config.get("head_dim") or h // heads
    block = 2 * h * heads * head_dim + 2 * h * kv * head_dim + 3 * h * inter
    head = model_config["vocab_size"] * h
    tokens = batch * (width - 1)
    forward = 2 * tokens * (model_config["num_hidden_layers"] * block + head)
    backward = 2 * tokens * (adapted_layers * block + head)
    return (forward + backward) / 1e9


def completion_row(row: dict[str, Any]) -> dict[str, str]:
    """A prepared row as mlx-lm prompt/completion data: the prompt is the text before the first train span,
    so a chat template that renders contents verbatim gives back the same text."""
    text, spans = row["text"], row.get("train_spans") or []
    start = min(s for s, _ in spans) if spans else len(text)
    return {"prompt": text[:start], "completion": text[start:]}


def mlx_lm_loss_positions(length: int, offset: int, max_seq_length: int) -> int:
    """Targets mlx-lm's default_loss trains for one example: positions offset..length inclusive
    (`steps >= offset` and `steps <= lengths`: one past the last token), at least 1, below the batch width."""
    last = min(length, max_seq_length - 1)
    return max(0, last - max(offset, 1) + 1)


def loss_token_check(
    finetune_items: list[tuple[list[int], list[int]]],
    mlx_items: list[tuple[list[int], int]],
    max_seq_length: int,
) -> dict[str, Any]:
    """Compare FineTune's (ids, mask) with mlx-lm's (ids, offset) per example (pure).

    Counts the loss targets each trains per epoch, rows whose token ids agree, and rows whose masked prompt
    agrees (mlx-lm's offset == FineTune's first trained position, or both train from position 1).
    """
    ft_tokens = sum(sum(m[1:]) for _, m in finetune_items)
    mlx_tokens = sum(mlx_lm_loss_positions(len(ids), off, max_seq_length) for ids, off in mlx_items)
    pairs = list(zip(finetune_items, mlx_items, strict=False))
    same_ids = sum(a == b for (a, _), (b, _) in pairs)
    same_prefix = sum(b[: len(a)] == a for (a, _), (b, _) in pairs)  # mlx-lm's text rows append EOS
    same_prompt = 0
    for (_, mask), (_, off) in pairs:
        first = next((i for i, v in enumerate(mask) if v and i >= 1), None)
        same_prompt += first is not None and max(off, 1) == first
    return {
        "rows": len(finetune_items),
        "mlx_lm_rows": len(mlx_items),
        "finetune_loss_tokens": ft_tokens,
        "mlx_lm_loss_tokens": mlx_tokens,
        "same_ids": same_ids,
        "same_ids_prefix": same_prefix,
        "same_prompt_mask": same_prompt,
    }


def epoch_steps(examples: int, batch_size: int) -> int:
    """Batches per epoch: FineTune, mlx-lm and the peft child drop the last incomplete length bucket."""
    return max(1, examples // batch_size)


def rotated(tools: tuple[str, ...], rnd: int) -> tuple[str, ...]:
    """Who goes first rotates each round: drift on the shared machine hits every tool alike."""
    k = rnd % len(tools)
    return tools[k:] + tools[:k]


def per_round(runs: list[Run], value) -> dict[tuple[str, int], float]:
    """value(run) per (tool, round) of the successful runs, where value gives a number."""
    out = {}
    for r in runs:
        v = None if r.error else value(r)
        if v:
            out[(r.tool, r.round)] = v
    return out


def round_ratios(values: dict[tuple[str, int], float], a: str, b: str) -> list[float]:
    """values[a] / values[b] per round both have (values are higher-is-better)."""
    rounds = sorted({rnd for _, rnd in values})
    return [values[(a, r)] / values[(b, r)] for r in rounds if (a, r) in values and (b, r) in values]


def median_or_none(values) -> float | None:
    return median([v for v in values if v is not None])
