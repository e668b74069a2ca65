"""Stage 1, configuration: the typed schema, the YAML profiles shipped in profiles/, and the precedence rule."""
