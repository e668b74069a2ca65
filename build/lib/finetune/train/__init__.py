"""Stage 4, training: the memory estimate, masked batches and the engine on mlx-lm's train()."""
