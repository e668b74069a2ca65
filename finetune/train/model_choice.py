"""Which packaged model and batch size fit the memory this machine has free (tiers 2 and 3 use it).

The need of (model, batch) comes from the memory estimator (finetune.train.memory): tier 2's memory gate
runs a full fine-tune probe in a child while the parent holds the LoRA model, so need = full estimate +
LoRA estimate + RUNTIME_OVERHEAD (Python, torch, the GGUF runtimes). Models are tried in order of
preference (SmolLM2 first: the quickest that proves the pipeline), each at the largest batch that fits;
a named model (FT_TEST_MODEL / FT_E2E_MODEL_ID) gets the largest batch that fits for it.
"""

from __future__ import annotations

from dataclasses import dataclass

from finetune.models.gemma import GEMMA3
from finetune.models.packaged import SMOLLM2
from finetune.train.memory import estimate, per_rank_batch
from finetune.train.model_shape import ModelShape

GIB = 1024**3
RUNTIME_OVERHEAD = GIB
BATCHES = (4, 2, 1)
SIZING_SEQ_LEN = 128  # the tiers' rows are <= ~70 tokens; max_seq_length bounds them
# The shapes of the packaged real models (their config.json), so choosing needs no model build.
SHAPES = {
    SMOLLM2: ModelShape(
        hidden_size=576,
        num_layers=30,
        num_heads=9,
        num_kv_heads=3,
        head_dim=64,
        intermediate_size=1536,
        vocab_size=49152,
    ),
    GEMMA3: ModelShape(
        hidden_size=640,
        num_layers=18,
        num_heads=4,
        num_kv_heads=1,
        head_dim=256,
        intermediate_size=2048,
        vocab_size=262144,
        model_type="gemma3_text",
    ),
}
PREFERENCE = (SMOLLM2, GEMMA3)


@dataclass(frozen=True)
class Choice:
    model_spec: str | None
    batch_size: int
    reason: str


def need_bytes(shape: ModelShape, batch: int) -> int:
    lora = estimate(shape, fine_tune_type="lora", batch_size=batch, seq_len=SIZING_SEQ_LEN, lora_num_layers=8)
    full = estimate(shape, fine_tune_type="full", batch_size=batch, seq_len=SIZING_SEQ_LEN)
    return lora.total_bytes + full.total_bytes + RUNTIME_OVERHEAD


def choose_for_memory(
    available_bytes: int | None, model: str | None = None, config: dict | None = None
) -> Choice:
    """Pick model (unless given) and batch size from available memory; the reason names the numbers.

    A named model that is not packaged is sized from its config.json (`config`); without one it gets batch 1."""
    if available_bytes is None:
        return Choice(None, 0, "available memory unknown: not choosing a model")
    have = available_bytes / GIB
    shapes = {spec: SHAPES[spec] for spec in PREFERENCE} if model is None else {}
    if model is not None:
        try:
            shapes[model] = SHAPES.get(model) or ModelShape.from_hf_config(config or {})
        except (TypeError, ValueError) as exc:
            return Choice(model, 1, f"{model}: batch 1 (its memory need is not known here: {exc})")
    for spec, shape in shapes.items():
        for batch in BATCHES:
            need = need_bytes(shape, batch)
            if available_bytes >= need:
                return Choice(
                    spec,
                    batch,
                    f"{have:.1f} GiB available >= {need / GIB:.1f} GiB estimated for {spec} batch {batch}",
                )
    smallest = min(need_bytes(shape, 1) for shape in shapes.values())
    return Choice(
        None,
        0,
        f"only {have:.2f} GiB available; {model or 'the smallest packaged model'} needs "
        f">= {smallest / GIB:.1f} GiB (estimated): skipping",
    )


def choose_ranks(
    requested: str | None, cpus: int | None, available_bytes: int | None, shape: ModelShape | None, batch: int
) -> tuple[int, str]:
    """Local data-parallel ranks for a tier run: `requested` (FT_RANKS) when given, else 2 where there are
    cores for two ranks and the memory gate's full probe beside them (3: on 2 cores the probe would wait for
    training, and 2 ranks made tier 2 slower here: 63 s against 38 s), two rows per batch, and the memory."""
    if requested:
        n = int(requested)
        if not 1 <= n <= batch:
            raise ValueError(f"FT_RANKS={requested}: needs 1 <= ranks <= the batch size ({batch})")
        return n, f"FT_RANKS={n}"
    if (cpus or 1) < 3 or batch < 2:
        return 1, f"1 rank ({cpus or 1} core(s), batch {batch})"
    if shape is None or available_bytes is None:
        return 1, "1 rank (the memory two ranks need is not known here)"
    per_rank = estimate(shape, fine_tune_type="lora", batch_size=per_rank_batch(batch, 2), seq_len=SIZING_SEQ_LEN,
                        lora_num_layers=8).total_bytes  # fmt: skip
    full = estimate(shape, fine_tune_type="full", batch_size=batch, seq_len=SIZING_SEQ_LEN).total_bytes
    need = max(2 * per_rank, full) + RUNTIME_OVERHEAD
    if available_bytes < need:
        return 1, f"1 rank: {available_bytes / GIB:.1f} GiB < {need / GIB:.1f} GiB for 2"
    return 2, f"2 local ranks: {cpus} cores, {available_bytes / GIB:.1f} GiB >= {need / GIB:.1f} GiB"
