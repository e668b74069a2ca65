"""Tier 3 evaluation: the same greedy probes through every runtime, plus the GGUF's tokenization and logprobs.

Runtimes: mlx_base (the base model, for comparison), then the fine-tuned model as mlx_adapter (base + SAVED
adapter), mlx_fused (the fused folder), llamacpp (the GGUF in llama.cpp) and ollama (the GGUF Ollama serves).
This module only measures; finetune.gates.runtime_parity.judge_runtimes judges. Each runtime is a plain callable in
`Backends`, so tests drive the evaluation with fakes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune import faults
from finetune.evaluate.base_answers import base_answers
from finetune.evaluate.logprob_parity import LogprobParity
from finetune.evaluate.prompts import TOKENIZER_TEXTS, EvalPrompt, build_prompts
from finetune.gates.parity import Answer, ReferenceRows
from finetune.gates.runtime_parity import RuntimeMeasurements
from finetune.gates.scoring import answer_score, right_score
from finetune.system.beside import Worker

Log = Callable[[str], None]


@dataclass(frozen=True)
class EvalSettings:
    # Sized for a shared 2-core box: 24 prompts x 5 runtimes.
    n_train: int = 12
    n_heldout: int = 12
    max_tokens: int | None = None  # None: the data's answer budget (finetune.evaluate.budget)
    logprob_prompts: int = 2  # prompt + answer sequences compared position by position, each on its own
    # llama.cpp's f16 KV cache (as Ollama runs) drifts with depth: SmolLM2 0.04 on the built-in sets' short
    # sequences, 0.108 at depth 246 of a HumanEval prompt + answer, 0.21 at 1024. The f16 tolerance holds to
    # here; deeper positions are the long part's, compared with an f32 cache.
    short_depth: int = 160
    top_k: int = 20  # the tokens llama.cpp lists per position
    ref_top_k: int = 5  # the reference's most likely tokens llama.cpp must list too (two-sided)
    long_context: int = 1024  # tokens of the long-context sequence (at most the model's context)
    long_positions: int = 64  # its last positions compared, as llama.cpp continues it

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class EvalInputs:
    base_dir: Path
    adapter_dir: Path
    fused_dir: Path
    gguf: Path
    gguf_type: str
    data_dir: Path
    template: str  # data.template
    stops: list[str]
    max_tokens: int  # the generation budget of every runtime we ask with our own options
    settings: EvalSettings = field(default_factory=EvalSettings)
    llamacpp_reason: str | None = None  # why llama.cpp cannot run here; None = available
    # the served model asked with default requests (its Modelfile decides); None = not deployed
    ollama: Callable[[Sequence[EvalPrompt]], list[Answer]] | None = None
    ollama_reason: str = "the model is not deployed to Ollama"
    model_context: int | None = None  # the base model's context length (config.json); None: unknown
    # where logprob measurements are kept by the content of what they measured (logprob_cache); None: nowhere
    cache_dir: Path | None = None
    # where the base model's answers are kept by content, across runs (base_answers); None: decoded every time
    base_answers_dir: Path | None = None


@dataclass
class Backends:
    load_tokenizer: Callable[[Path], Any]
    mlx_generate: Callable[[Path, Path | None, Sequence[str], int], list[Answer]]
    # (model dir, adapter dir, [(ids, ids to read per position, first position)], top k) -> ReferenceRows each
    mlx_logprobs: Callable[[Path, Path | None, Sequence[tuple], int], list[ReferenceRows]]
    llamacpp_generate: Callable[[Path, Sequence[str], int, Sequence[str]], list[Answer]]
    llamacpp_tokenize: Callable[[Path, Sequence[str]], list[list[int]]]
    llamacpp_logprobs: Callable[[Path, Sequence[int], int], list[dict[int, float]]]
    # (gguf, prompt ids, n, k) -> llama.cpp's greedy continuation, per token (id, its top-k logprobs)
    llamacpp_continuation: Callable[[Path, Sequence[int], int, int], list[tuple[int, dict[int, float]]]]
    # frees what the MLX backends kept loaded (the real ones keep the last model: base + adapter decodes, then
    # scores the logprob reference without loading it again)
    close: Callable[[], None] = lambda: None


def score_runtime(name: str, prompts: Sequence[EvalPrompt], answers: Sequence[Answer]) -> dict[str, Any]:
    out: dict[str, Any] = {"runtime": name}
    for kind in ("train", "heldout"):
        scores = [
            answer_score(a.text, p.reference) for p, a in zip(prompts, answers, strict=True) if p.kind == kind
        ]
        n = len(scores)
        contains = sum(map(right_score, scores))  # graded by similarity for long references
        exact = sum(s == 2 for s in scores)
        out[kind] = {"n": n, "exact": exact, "contains": contains, "score": contains / n if n else 0.0}
    return out


def score_runtimes(prompts: Sequence[EvalPrompt], answers: dict[str, list[Answer]]) -> list[dict[str, Any]]:
    return [score_runtime(name, prompts, got) for name, got in answers.items()]


def _timed(runtimes: dict, name: str, fn: Callable[[], Any], log: Log) -> Any:
    tic = time.perf_counter()
    log(f"[evaluate] {name} ...")
    try:
        out = fn()
    except Exception as exc:  # one runtime failing is a gate failure, not a crash of the whole evaluation
        runtimes[name] = {"status": "failed", "reason": f"{type(exc).__name__}: {exc}"}
        log(f"[evaluate] {name} failed: {runtimes[name]['reason']}")
        return None
    runtimes[name] = {"status": "passed", "reason": None, "seconds": round(time.perf_counter() - tic, 2)}
    return out


def run_evaluation(inputs: EvalInputs, backends: Backends, *, log: Log = print) -> RuntimeMeasurements:
    from finetune.data.templates import get_template

    s = inputs.settings
    tokenizer = backends.load_tokenizer(inputs.fused_dir)
    template = get_template(inputs.template, tokenizer=tokenizer)
    prompts = build_prompts(inputs.data_dir, template, n_train=s.n_train, n_heldout=s.n_heldout)
    end_ids = _end_ids(tokenizer, inputs.stops)
    stops = list(inputs.stops)
    m = RuntimeMeasurements(prompts=prompts, gguf_type=inputs.gguf_type, stops=stops, end_ids=end_ids)
    parity = LogprobParity(inputs, tokenizer) if inputs.llamacpp_reason is None else None
    try:
        finish = _answer_on_every_runtime(m, inputs, backends, tokenizer, log, parity)
        if parity is not None:  # while llama.cpp and Ollama may still be answering beside
            parity.measure(m, backends, log)
    finally:
        backends.close()
        if parity is not None:
            parity.fused_answered.set()  # a worker still waiting for it is not left waiting
    finish()
    return m


def _answer_on_every_runtime(
    m: RuntimeMeasurements,
    inputs: EvalInputs,
    backends: Backends,
    tokenizer: Any,
    log: Log,
    parity: LogprobParity | None,
) -> Callable[[], None]:
    """Every runtime answers the same prompts; one that fails is recorded as failed, one not built as skipped.
    MLX answers here; llama.cpp and Ollama beside, then llama.cpp's tokenizer and logprob measurements.
    Returns finish(): it waits for them."""
    prompts, budget = m.prompts, inputs.max_tokens
    texts = [p.prompt for p in prompts]

    def run(name: str, fn: Callable[[], list[Answer]]) -> None:
        got = _timed(m.runtimes, name, fn, log)
        if got is not None:
            m.answers[name] = list(got)

    fused_dir = faults.point("eval_runtime_base", inputs.fused_dir, inputs.base_dir)

    def gguf_side() -> None:
        if parity is not None:
            parity.llamacpp_long(backends)
        if inputs.llamacpp_reason is None:
            run("llamacpp", lambda: backends.llamacpp_generate(inputs.gguf, texts, budget, inputs.stops))
        else:
            m.runtimes["llamacpp"] = {"status": "skipped", "reason": inputs.llamacpp_reason}
        if inputs.ollama is not None:
            run("ollama", lambda: inputs.ollama(prompts))
        else:
            m.runtimes["ollama"] = {"status": "skipped", "reason": inputs.ollama_reason}
        if "ollama" in m.answers:
            _served_prompts(m, inputs, backends, tokenizer)
        if parity is not None:
            _tokenizer_parity(m, inputs, backends, tokenizer, log)
            parity.llamacpp_short(m, backends)

    # llama.cpp and Ollama decode in child processes on the core MLX leaves idle (it trains and decodes with
    # one BLAS thread); a daemon thread, so Ctrl-C is not held up by a child that is still answering
    worker = Worker(gguf_side, "ft-eval-gguf")

    def base() -> list[Answer]:
        return backends.mlx_generate(inputs.base_dir, None, texts, budget)

    run("mlx_base", lambda: base_answers(inputs.base_answers_dir, inputs.base_dir, texts, budget, base, log))
    run("mlx_fused", lambda: backends.mlx_generate(fused_dir, None, texts, budget))
    if parity is not None:
        parity.fused_answered.set()
    # last: the logprob reference is base + adapter too, and the real backend keeps it loaded for it
    run("mlx_adapter", lambda: backends.mlx_generate(inputs.base_dir, inputs.adapter_dir, texts, budget))

    def finish() -> None:
        worker.join()
        m.answers = {k: m.answers[k] for k in RUNTIMES if k in m.answers}  # one order however they finished
        m.runtimes = {k: m.runtimes[k] for k in RUNTIMES if k in m.runtimes}

    return finish


def _tokenizer_parity(
    m: RuntimeMeasurements, inputs: EvalInputs, backends: Backends, tokenizer: Any, log: Log
) -> None:
    m.tokenizer_texts = [*TOKENIZER_TEXTS, *(p.prompt for p in m.prompts[:4])]
    m.hf_ids = [list(tokenizer.encode(t)) for t in m.tokenizer_texts]
    log("[evaluate] tokenizer parity (llama.cpp) ...")
    try:
        m.gguf_ids = backends.llamacpp_tokenize(inputs.gguf, m.tokenizer_texts)
    except Exception as exc:
        m.gguf_ids_error = f"{type(exc).__name__}: {exc}"


def _served_prompts(m: RuntimeMeasurements, inputs: EvalInputs, backends: Backends, tokenizer: Any) -> None:
    """The prompts Ollama rendered, read by the GGUF's tokenizer in llama.cpp (as Ollama's runner reads them;
    HF's where llama.cpp cannot run), next to the ids training's renderer gives."""
    from finetune.evaluate.decode import prompt_ids

    m.training_prompt_ids = [prompt_ids(tokenizer, p.prompt) for p in m.prompts]
    rendered = [a.rendered for a in m.answers["ollama"]]
    shown = [r for r in rendered if r is not None]
    try:
        if inputs.llamacpp_reason is not None:
            raise RuntimeError(inputs.llamacpp_reason)
        ids = iter(backends.llamacpp_tokenize(inputs.gguf, shown) if shown else [])
        m.served_ids_tokenizer = "the GGUF's, in llama.cpp"
    except Exception as exc:
        ids = iter([prompt_ids(tokenizer, r) for r in shown])
        m.served_ids_tokenizer = f"HF's (llama.cpp: {type(exc).__name__}: {str(exc)[:80]})"
    m.served_prompt_ids = [None if r is None else list(next(ids)) for r in rendered]


RUNTIMES = ("mlx_base", "mlx_adapter", "mlx_fused", "llamacpp", "ollama")


def _end_ids(tokenizer: Any, stops: Sequence[str]) -> list[int]:
    ids = {i for i in (tokenizer.convert_tokens_to_ids(t) for t in stops) if isinstance(i, int)}
    if getattr(tokenizer, "eos_token_id", None) is not None:
        ids.add(tokenizer.eos_token_id)
    ids.discard(getattr(tokenizer, "unk_token_id", None))
    return sorted(ids)
