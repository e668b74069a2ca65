"""Stage 3, models: resolve a model spec to a local HF folder (packaged, built, local or Hub) and cache it."""
