"""Stage 5, export: fuse the adapter into a full-precision HF folder and write GGUF."""
