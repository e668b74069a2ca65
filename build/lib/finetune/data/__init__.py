"""Stage 2, data: read datasets, normalize records, render chat templates, tokenize with loss masks, split."""
