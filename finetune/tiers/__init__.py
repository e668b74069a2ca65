"""Orchestration: one stage model (a stage is a function of a context that writes into the run directory);
`finetune run` (tiers 1 and 2) and `finetune pipeline` (tier 3) differ only in their stages and gates."""
