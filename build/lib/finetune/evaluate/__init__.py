"""Stage 7, evaluation: the same greedy probes through every runtime, and the measurements the gates judge."""
