"""Judging: every gate is a pure function from measurements to a Verdict. Measuring happens in the stages."""
