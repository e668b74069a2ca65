"""FineTune: LoRA fine-tuning on MLX with gates that can fail."""

__version__ = "0.1.0"
