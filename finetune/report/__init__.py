"""Stage 8, reporting: the report schema (pydantic), artifacts with sha256, console summary."""
