"""The run configuration's typed schema: one pydantic model per section, every field validated.

Profiles (profiles/*.yaml) and user files are read into this by finetune.config.loader.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, field_validator, model_validator

from finetune.gates.thresholds import THRESHOLDS, Threshold


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class ModelConfig(_Section):
    # A packaged name (smollm2-135m, tiny-llama), a local HF folder, or a Hub id (online only).
    name: str = "smollm2-135m"
    trust_remote_code: bool = False


class DataConfig(_Section):
    # A file (jsonl/json/csv), a saved HF dataset, a Hub id, or builtin:<geography|arithmetic|patterns|mixed>.
    source: str = "builtin:mixed"
    format: Literal["auto", "alpaca", "chat", "prompt_completion", "text"] = "auto"
    template: Literal["tokenizer", "auto", "chatml", "gemma", "alpaca", "llama2", "llama3", "plain"] = (
        "tokenizer"
    )
    splits: tuple[float, float, float] = (0.8, 0.1, 0.1)
    max_seq_length: int = Field(256, ge=8)
    mask_prompt: bool = True
    seed: int = 0
    num_examples: int = Field(120, ge=1)
    # our field -> your dataset's column, e.g. {output: response, instruction: question}
    fields: dict[str, str] = Field(default_factory=dict)
    # the share of rows read that may be dropped (rejected, duplicate, nothing left to train) before a run stops
    max_rejected: float = Field(0.05, ge=0, le=1)

    @field_validator("fields")
    @classmethod
    def _known_fields(cls, fields: dict[str, str]) -> dict[str, str]:
        known = (
            "instruction",
            "input",
            "output",
            "system",
            "prompt",
            "completion",
            "text",
            "messages",
            "reference",
        )
        if unknown := sorted(set(fields) - set(known)):
            raise ValueError(
                f"unknown field {', '.join(unknown)}: data.fields maps one of {', '.join(known)} to your column"
            )
        return fields

    @field_validator("splits")
    @classmethod
    def _splits_sum(cls, splits: tuple[float, float, float]) -> tuple[float, float, float]:
        if any(s <= 0 for s in splits) or abs(sum(splits) - 1.0) > 1e-6:  # 0 used to pass here, fail later
            raise ValueError(
                f"splits must be three shares above 0 (train, valid, test: each needs a row) summing to 1, "
                f"got {list(splits)}"
            )
        return splits


class LoraConfig(_Section):
    rank: int = Field(8, ge=1)
    # mlx-lm's `scale` multiplies the adapter output; PEFT/llama.cpp's `alpha` gives scale = alpha / rank.
    scale: float = Field(20.0, gt=0)
    dropout: float = Field(0.0, ge=0, lt=1)
    keys: list[str] | None = None
    num_layers: int = Field(-1, ge=-1)

    @model_validator(mode="before")
    @classmethod
    def _alpha_to_scale(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("alpha") is not None:
            if data.get("scale") is not None:
                raise ValueError(
                    "give either scale (mlx-lm, a raw multiplier) or alpha (PEFT, scale = alpha / rank), not both"
                )
            data = dict(data)
            data["scale"] = float(data.pop("alpha")) / float(data.get("rank", 8))
        elif isinstance(data, dict) and "alpha" in data:
            data = {k: v for k, v in data.items() if k != "alpha"}
        return data

    @property
    def alpha(self) -> float:
        return self.scale * self.rank

    @model_validator(mode="after")
    def _num_layers(self) -> LoraConfig:
        if self.num_layers == 0:
            raise ValueError("num_layers must be -1 (all layers) or a positive count")
        return self


class TrainingConfig(_Section):
    fine_tune_type: Literal["lora", "dora", "full"] = "lora"
    optimizer: Literal["adam", "adamw", "sgd"] = "adam"
    learning_rate: float = Field(1e-4, ge=0)
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    warmup_steps: int = Field(0, ge=0)
    weight_decay: float = Field(0.0, ge=0)
    iters: int = Field(100, ge=1)
    batch_size: int = Field(4, ge=1)
    grad_accumulation_steps: int = Field(1, ge=1)
    grad_checkpoint: bool = False
    seed: int = 0
    eval_every: int = Field(25, ge=1)
    val_batches: int = Field(-1, ge=-1)
    save_every: int = Field(50, ge=1)
    # 0 disables early stopping; otherwise stop after this many evaluations without a better val loss.
    early_stopping_patience: int = Field(0, ge=0)
    # Exact shortcuts (finetune.train.shortcuts): the same losses and gradients up to float32 reassociation,
    # each left off automatically (and the run's report says why) where it would not be exact.
    cache_frozen_prefix: bool = Field(
        True, description="blocks below the adapters run once per example, not per step"
    )
    loss_positions_only: bool = Field(
        True, description="the LM head and loss run only where the loss mask is on"
    )
    trim_batches: bool = Field(True, description="columns after a batch's last loss position are dropped")
    # Data parallel (finetune.train.ranks): each rank trains on its share of every batch of batch_size rows.
    ranks: int = Field(1, ge=1, description="local ranks that share each batch (the same losses as 1 rank)")
    rank_timeout_s: float = Field(
        300.0, gt=0, description="a rank silent this long (no step, never connected) stops every rank"
    )

    @model_validator(mode="after")
    def _ranks(self) -> TrainingConfig:
        if self.ranks > self.batch_size:
            raise ValueError(
                f"ranks={self.ranks} needs batch_size >= ranks (each rank takes rows of every batch)"
            )
        return self


class LogprobTolerance(_Section):
    # Measured on SmolLM2-135M (top-10 logprobs, f32 MLX reference): f32 max 0.022, f16 max 0.041, q8_0 max 0.81.
    f32: float = Field(0.06, gt=0)
    f16: float = Field(0.1, gt=0)
    q8_0: float = Field(1.5, gt=0)


class _GatesSettings(_Section):
    """How the gates measure; their thresholds are added from the gate table (THRESHOLDS) below."""

    loss_window: int = Field(5, ge=1, description="steps averaged at each end, so one lucky step cannot pass")
    max_initial_loss: float | None = Field(
        None, description="a base model that starts absurdly high is the wrong model or template"
    )
    max_final_loss: float | None = Field(
        None, description="an upper bound on where training must end, when known"
    )
    learning_probes: int = Field(
        16,
        ge=1,
        description="training questions asked before and after (a 30% share is then 5 answers, not a fluke)",
    )
    quantized_text_agreement: float = Field(
        0.5, ge=0, le=1, description="text_agreement for a quantized GGUF, which may flip near-ties"
    )
    adapter_min_changed: float = Field(
        0.5, ge=0, le=1, description="share of answers a fine-tuned runtime must give unlike the base"
    )
    logprob_max_abs: LogprobTolerance = Field(
        default_factory=LogprobTolerance, description="largest top-10 logprob difference, per GGUF type"
    )
    skip: list[str] = Field(
        default_factory=list, description="gates you choose not to run: reported as skipped, allowed"
    )


def _threshold_field(t: Threshold) -> tuple[type, Any]:
    return float, Field(t.default, ge=t.ge, gt=t.gt, le=t.le, lt=t.lt, description=t.setting)


# gates.<threshold> for every number of the gate table: declared there once, validated here.
GatesConfig = create_model(
    "GatesConfig", __base__=_GatesSettings, **{t.key: _threshold_field(t) for t in THRESHOLDS}
)


# llama.cpp's quantized types Ollama's quantizer writes (finetune.export.quant_types.TYPES, checked equal by a test)
QuantType = Literal["q8_0", "q6_K", "q5_K_M", "q5_K_S", "q4_K_M", "q4_K_S", "q4_0", "q3_K_M", "q2_K"]


class ExportConfig(_Section):
    gguf_type: Literal["f16", "q8_0", "f32"] = "f16"  # the GGUF the pipeline judges against MLX and serves
    # What `finetune pipeline` ships beside it, each judged where users load it (`finetune export --as FORM`):
    gguf_types: list[QuantType] = Field(default_factory=list)  # quantized GGUFs, each vs the f16 GGUF
    adapters: list[Literal["peft", "gguf-lora"]] = Field(default_factory=list)  # the adapter on a shared base

    @field_validator("gguf_types", "adapters")
    @classmethod
    def _once_each(cls, v: list[str]) -> list[str]:
        if len(set(v)) != len(v):
            raise ValueError(f"each form once: {v}")
        return v

    def forms(self) -> list[str]:
        """The `finetune export --as` forms these name, adapters first (they are smaller and quicker)."""
        return [*self.adapters, *(f"gguf:{t}" for t in self.gguf_types)]


class DeployConfig(_Section):
    model_name: str = "finetune-model"
    template: str | None = None  # Ollama TEMPLATE; None derives it from the data template
    stop: list[str] = Field(default_factory=list)
    parameters: dict[str, Any] = Field(default_factory=lambda: {"temperature": 0, "num_thread": 1})
    system: str | None = None


class RunConfig(_Section):
    profile: str | None = None
    model: ModelConfig = Field(default_factory=ModelConfig)
    data: DataConfig = Field(default_factory=DataConfig)
    lora: LoraConfig = Field(default_factory=LoraConfig)
    training: TrainingConfig = Field(default_factory=TrainingConfig)
    gates: GatesConfig = Field(default_factory=GatesConfig)
    export: ExportConfig = Field(default_factory=ExportConfig)
    deploy: DeployConfig = Field(default_factory=DeployConfig)
    output_dir: str = "artifacts"

    def to_dict(self) -> dict[str, Any]:
        return self.model_dump(mode="json")
