"""The healthy run on the tiny model that the fault and chaos suites and the README's `make run` check share.

Tiny GPT-2 (random weights, GPT-2's real tokenizer, plain chat format) cannot memorise 40 facts in seconds,
but it learns one trained answer to varied questions in ~100 steps on every seed tried (tiny-llama did not
on seed 1): enough for every gate to have something real to judge (loss falls, the saved adapter changes
answers, base and tuned differ, every runtime must agree).
"""

from __future__ import annotations

import json
from pathlib import Path

from finetune.data import synthetic

MODEL = "tiny-gpt2"
ANSWER = "Yes"  # one token and the end marker: a random 2-layer model learns it in ~100 steps (measured)


def healthy_data(folder: Path, n: int = 24, seed: int = 0, answer: str = ANSWER) -> Path:
    """Questions from the built-in mixed set, each answered with `answer` (JSONL, chat shape)."""
    path = Path(folder) / f"tiny-healthy-{seed}{'' if answer == ANSWER else '-' + answer}.jsonl"
    built = synthetic.build("mixed", n=n, seed=seed)
    rows = [{"messages": [r["messages"][0], {"role": "assistant", "content": answer}], "reference": answer}
            for r in built.train]  # fmt: skip
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def healthy_sets(folder: Path, seed: int = 0, answer: str = ANSWER) -> list[str]:
    """--set assignments over the quick profile for a healthy tiny run (seconds per stage, every gate real)."""
    return [
        f"model.name={MODEL}",
        "data.template=plain",
        f"data.source={healthy_data(folder, seed=seed, answer=answer)}",
        f"data.seed={seed}",
        f"training.seed={seed}",
        "data.max_seq_length=128",
        "training.iters=150",
        "training.learning_rate=2e-2",
        "training.eval_every=50",
        "training.save_every=50",
        "gates.learning_probes=8",
        # random weights have no language to forget: general-text perplexity ~1e17 for base and adapter alike
        # (measured x0.12 and x7.9 on two healthy seeds); an explicit, reported skip, not a pass
        "gates.skip=[forgetting]",
        # f32: the random model's sharp logits put f16 rounding at ~0.1 logprob, the parity tolerance itself
        # (a healthy seed measured 0.103 once); the real models keep f16
        "export.gguf_type=f32",
    ]
