"""The real collaborators behind the workflow's stages (imports are lazy: the CLI starts fast)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from finetune.config import RunConfig
from finetune.workflow import Stages

BUILTIN = "builtin:"


def load_tokenizer(model_path: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(model_path))


def materialize_source(cfg: RunConfig, out_dir: Path) -> str:
    """A `builtin:<name>` source becomes a JSONL file (plus its held-out questions) in the run."""
    source = cfg.data.source
    if not source.startswith(BUILTIN):
        return source
    from finetune import synthetic

    out_dir.mkdir(parents=True, exist_ok=True)
    built = synthetic.build(source[len(BUILTIN) :], n=cfg.data.num_examples, seed=cfg.data.seed)
    synthetic.write_jsonl(built.train, out_dir / "source.jsonl")
    synthetic.write_jsonl(built.heldout, out_dir / "heldout.jsonl")
    return str(out_dir / "source.jsonl")


def prepare_data(cfg: RunConfig, out_dir: Path, tokenizer: Any):
    from finetune import data
    from finetune.templates import get_template

    template = get_template(cfg.data.template, tokenizer=tokenizer)
    source = materialize_source(cfg, Path(out_dir))
    return data.prepare(
        source,
        Path(out_dir),
        template=template,
        seed=cfg.data.seed,
        splits=tuple(cfg.data.splits),
        max_seq_length=cfg.data.max_seq_length,
        mask_prompt=cfg.data.mask_prompt,
        tokenizer=tokenizer,
        format=cfg.data.format,
    )


def estimate_for(cfg: RunConfig, model_config: dict):
    from finetune.memory import ModelShape, estimate

    return estimate(
        ModelShape.from_hf_config(model_config),
        fine_tune_type=cfg.training.fine_tune_type,
        batch_size=cfg.training.batch_size,
        seq_len=cfg.data.max_seq_length,
        lora_rank=cfg.lora.rank,
        lora_num_layers=cfg.lora.num_layers,
        lora_keys=cfg.lora.keys,
        grad_checkpoint=cfg.training.grad_checkpoint,
        optimizer=cfg.training.optimizer,
    )


def train(cfg: RunConfig, model_path: Path, data_dir: Path, run_dir: Path, resume: bool = False):
    from finetune import doctor
    from finetune.train import train_run

    print(doctor.render(doctor.collect()))
    return train_run(cfg, model_path, data_dir, run_dir, resume=resume)


def workflow_gates(cfg: RunConfig | None, run_dir: Path, trained: Any) -> list:
    """The gates that need no second model: loss convergence and artifacts."""
    from finetune.config import load_file
    from finetune.validate import artifacts, loss_convergence, read_metrics, train_losses

    cfg = cfg or load_file(Path(run_dir) / "config.yaml")
    g = cfg.gates
    losses = train_losses(read_metrics(Path(run_dir) / "metrics.jsonl"))
    window = min(g.loss_window, max(1, len(losses) // 2))
    return [
        loss_convergence(
            losses,
            drop=g.loss_drop,
            window=window,
            max_initial=g.max_initial_loss,
            max_final=g.max_final_loss,
        ),  # fmt: skip
        artifacts(Path(run_dir), require_summary=False),
    ]


def real_stages() -> Stages:
    from finetune.models import resolve_model

    return Stages(
        resolve_model=resolve_model,
        load_tokenizer=load_tokenizer,
        prepare_data=prepare_data,
        estimate=estimate_for,
        train=train,
        gates=workflow_gates,
    )
