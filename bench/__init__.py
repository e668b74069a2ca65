"""FineTune benchmarks: `python -m bench.run` (or `make bench`) writes docs/benchmarks.md and .json."""
