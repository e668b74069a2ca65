"""The base model's measurements, made while the run trains, on the core training leaves idle.

Nothing in them depends on the adapter: the learning measurement's base part (run_measurements.base_learning:
the base's answers to the probes, its teacher-forced loss and general-text NLL) and, for a pipeline, the base's
answers to the evaluation's prompts (base_answers). They land in the caches the judge and the evaluation read
by content, so those decode only what the run made. It runs in a child process (`python -m
finetune.evaluate.base_prefetch RUN BASE [--evaluation]`) after the full fine-tuning probe, one child beside
training at a time (when the ranks use every core: once training ends, beside the judge's measurement of the
adapter); a child that fails leaves the judge to measure it, saying so.
"""

from __future__ import annotations

import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from finetune.system.beside import Finish, beside
from finetune.system.procs import spawn_guarded, stop_group


def prefetch(
    run_dir: Path,
    base_dir: Path,
    *,
    after: Finish | None = None,
    evaluation: bool = False,
    timeout: float = 900,
    where: str = "beside training",
) -> Finish:
    """Start measuring once `after` (the work already beside training) is done. Returns finish(cancel): it waits
    for both (or stops both first) and says what happened; `where` it ran (ranks on every core: beside the
    judge)."""

    def work(stop: threading.Event) -> str:
        if stop.is_set():
            return "base answers not prefetched (stopped)"
        cmd = [sys.executable, "-m", "finetune.evaluate.base_prefetch", str(run_dir), str(base_dir)]
        cmd += ["--evaluation"] if evaluation else []
        with tempfile.TemporaryFile("w+") as err:
            proc = spawn_guarded(cmd, name="base-learning", stdout=subprocess.DEVNULL, stderr=err,
                                 stdin=subprocess.DEVNULL)  # fmt: skip
            deadline = time.monotonic() + timeout
            try:
                while proc.poll() is None and not stop.wait(0.1) and time.monotonic() < deadline:
                    pass
            finally:
                stop_group(proc, grace=2)
            if proc.returncode == 0:
                return f"base answers measured {where}"
            err.seek(0)
            tail = " | ".join(err.read().strip().splitlines()[-3:])[:300]
            why = "stopped" if stop.is_set() else f"exit {proc.returncode}: {tail}"
            return f"base answers not prefetched ({why}); the judge measures them"

    return beside(work, "prefetch-base-learning", after=after)


def main(argv: list[str] | None = None) -> int:
    from finetune.config.loader import load_file
    from finetune.data.templates import get_template
    from finetune.evaluate.budget import answer_budget
    from finetune.evaluate.run_measurements import base_learning
    from finetune.models.tokenizer import load_tokenizer

    args = list(argv if argv is not None else sys.argv[1:])
    evaluation = "--evaluation" in args
    run_dir, base_dir = (Path(a) for a in args if a != "--evaluation")
    cfg = load_file(run_dir / "config.yaml")  # the run's own (finetune.stages.rundir)
    tokenizer = load_tokenizer(base_dir)  # stops and budget as the judge derives them: the same cache key
    template = get_template(cfg.data.template, tokenizer=tokenizer)
    budget = answer_budget(run_dir / "data", tokenizer).tokens
    base_learning(run_dir, base_dir, cfg, template.stop_strings, max_tokens=budget)
    if evaluation:
        _evaluation_answers(run_dir, base_dir, template, budget)
    return 0


def _evaluation_answers(run_dir: Path, base_dir: Path, template: object, budget: int) -> None:
    """The base's answers to the evaluation's prompts, as its mlx_base runtime decodes them (default settings;
    a pipeline run with others misses this cache and decodes them itself)."""
    from finetune.evaluate import decode
    from finetune.evaluate.base_answers import FOLDER, base_answers
    from finetune.evaluate.evaluation import EvalSettings
    from finetune.evaluate.prompts import build_prompts
    from finetune.models.cache import cache_root

    s = EvalSettings()
    prompts = build_prompts(run_dir / "data", template, n_train=s.n_train, n_heldout=s.n_heldout)
    texts, tokens = [p.prompt for p in prompts], s.max_tokens or budget
    base_answers(
        cache_root() / FOLDER,
        base_dir,
        texts,
        tokens,
        lambda: decode.answers_from_disk(base_dir, None, texts, tokens),
    )


if __name__ == "__main__":
    raise SystemExit(main())
