"""FineTune: LoRA fine-tuning on MLX with gates that can fail.

Subpackages, in the order data flows: config -> data -> models -> train -> gates -> export -> serve ->
evaluate -> report, orchestrated by tiers; system holds the machine and process plumbing they share.
"""

from finetune.system import blas as _blas

# Before any finetune module imports mlx.core: MLX's Linux wheel otherwise uses a ~40x slower reference BLAS.
_blas.preload()

__version__ = "0.2.0"
