"""FineTune: LoRA fine-tuning on MLX with gates that can fail."""

from finetune import blas as _blas

# Before any finetune module imports mlx.core: MLX's Linux wheel otherwise uses a ~40x slower reference BLAS.
_blas.preload()

__version__ = "0.1.0"
