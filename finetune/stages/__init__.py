"""The stages: each a plain function of a context (`Ctx`) that reads what earlier stages left in the run
directory and writes its own artifacts there; the runner replays one whose inputs are unchanged."""
