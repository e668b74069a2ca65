"""Tier 3 evaluation: the same greedy prompts through every runtime, scores against references, and gates.

Runtimes: mlx_base (the base model, for comparison), then the fine-tuned model as mlx_adapter (base +
adapter), mlx_fused, llamacpp (the GGUF in llama.cpp) and ollama (the GGUF served by Ollama). Each runtime
is a plain callable in `Backends`, so tests drive the evaluation with fakes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from finetune import parity
from finetune.data_sources import read_jsonl
from finetune.llamacpp import LOGPROB_TOLERANCE, SAMPLE_TEXTS, logprob_parity
from finetune.parity import Answer
from finetune.validate import Verdict, answer_score

TUNED = ("mlx_adapter", "mlx_fused", "llamacpp", "ollama")
REFERENCE = "mlx_adapter"
Log = Callable[[str], None]


@dataclass(frozen=True)
class EvalPrompt:
    kind: str  # "train" or "heldout"
    question: str  # the user message (what Ollama's TEMPLATE renders)
    prompt: str  # the same message rendered with the training template
    reference: str
    category: str = ""


@dataclass(frozen=True)
class EvalSettings:
    # Sized for a shared 2-core box: 24 prompts x 5 runtimes of <= 24 tokens is ~2-3 minutes.
    n_train: int = 12
    n_heldout: int = 12
    max_tokens: int = 24
    logprob_prompts: int = 2  # prompt + answer sequences compared position by position (~25 tokens each)
    top_k: int = 10
    text_agreement: float = parity.TEXT_AGREEMENT
    min_changed: float = parity.MIN_CHANGED
    min_train_score: float = parity.MIN_TRAIN_SCORE

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
    settings: EvalSettings = field(default_factory=EvalSettings)
    llamacpp_reason: str | None = None  # why llama.cpp cannot run here; None = available
    ollama: Callable[[Sequence[EvalPrompt], int], list[Answer]] | None = None  # None = not deployed


@dataclass
class Backends:
    load_tokenizer: Callable[[Path], Any]
    mlx_generate: Callable[[Path, Path | None, Sequence[str], int], list[Answer]]
    mlx_logprobs: Callable[[Path, Sequence[int]], np.ndarray]
    llamacpp_generate: Callable[[Path, Sequence[str], int, Sequence[str]], list[Answer]]
    llamacpp_tokenize: Callable[[Path, Sequence[str]], list[list[int]]]
    llamacpp_logprobs: Callable[[Path, Sequence[int], int], list[dict[int, float]]]


@dataclass
class EvalOutcome:
    prompts: list[EvalPrompt]
    answers: dict[str, list[Answer]]
    runtimes: dict[str, dict[str, Any]]  # name -> {"status": passed|failed|skipped, "reason", "seconds"}
    verdicts: list[Verdict]
    skipped_gates: dict[str, str]
    served_runtime: str | None

    @property
    def passed(self) -> bool:
        return bool(self.verdicts) and all(v.passed for v in self.verdicts)

    def scores(self) -> list[dict[str, Any]]:
        return [score_runtime(name, self.prompts, got) for name, got in self.answers.items()]

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompts": [asdict(p) for p in self.prompts],
            "answers": {k: [a.to_dict() for a in v] for k, v in self.answers.items()},
            "runtimes": self.runtimes,
            "verdicts": [v.to_dict() for v in self.verdicts],
            "skipped_gates": self.skipped_gates,
            "served_runtime": self.served_runtime,
            "scores": self.scores(),
        }


# ---------------------------------------------------------------- prompts and scores


def build_prompts(data_dir: Path, template: Any, *, n_train: int, n_heldout: int) -> list[EvalPrompt]:
    """The first n_train training rows and n_heldout held-out rows (prepare_data's files, in their order).

    train.jsonl keeps only the rendered prompt; the user message comes from source.jsonl, matched by
    rendering each source conversation the same way.
    """
    data_dir = Path(data_dir)
    by_prompt = {}
    for row in read_jsonl(data_dir / "source.jsonl"):
        by_prompt[template.render_prompt(row["messages"][:-1])] = row["messages"][-2]["content"]
    out = []
    for i, row in enumerate(read_jsonl(data_dir / "train.jsonl")[:n_train]):
        if row["prompt"] not in by_prompt:
            raise ValueError(f"{data_dir / 'train.jsonl'}: row {i + 1}'s prompt is not in source.jsonl")
        out.append(
            EvalPrompt(
                "train", by_prompt[row["prompt"]], row["prompt"], row["reference"], row.get("kind", "")
            )
        )
    for row in read_jsonl(data_dir / "heldout.jsonl")[:n_heldout]:
        messages = row["messages"]
        out.append(
            EvalPrompt(
                "heldout",
                messages[-2]["content"],
                template.render_prompt(messages[:-1]),
                row["reference"],
                row.get("kind", ""),
            )
        )
    return out


def score_runtime(name: str, prompts: Sequence[EvalPrompt], answers: Sequence[Answer]) -> dict[str, Any]:
    out: dict[str, Any] = {"runtime": name}
    for kind in ("train", "heldout"):
        scores = [
            answer_score(a.text, p.reference) for p, a in zip(prompts, answers, strict=True) if p.kind == kind
        ]
        n = len(scores)
        contains = sum(1 for s in scores if s >= 1)
        out[kind] = {
            "n": n,
            "exact": sum(1 for s in scores if s == 2),
            "contains": contains,
            "score": contains / n if n else 0.0,
        }
    return out


# ---------------------------------------------------------------- the evaluation


def _timed(runtimes: dict, name: str, fn: Callable[[], Any], log: Log) -> Any:
    import time

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


def run_evaluation(inputs: EvalInputs, backends: Backends, *, log: Log = print) -> EvalOutcome:
    from finetune.templates import get_template

    s = inputs.settings
    tokenizer = backends.load_tokenizer(inputs.fused_dir)
    template = get_template(inputs.template, tokenizer=tokenizer)
    prompts = build_prompts(inputs.data_dir, template, n_train=s.n_train, n_heldout=s.n_heldout)
    texts = [p.prompt for p in prompts]
    runtimes: dict[str, dict[str, Any]] = {}
    answers: dict[str, list[Answer]] = {}
    skipped: dict[str, str] = {}

    def run(name: str, fn: Callable[[], list[Answer]]) -> None:
        got = _timed(runtimes, name, fn, log)
        if got is not None:
            answers[name] = list(got)

    run("mlx_base", lambda: backends.mlx_generate(inputs.base_dir, None, texts, s.max_tokens))
    run(
        "mlx_adapter", lambda: backends.mlx_generate(inputs.base_dir, inputs.adapter_dir, texts, s.max_tokens)
    )
    run("mlx_fused", lambda: backends.mlx_generate(inputs.fused_dir, None, texts, s.max_tokens))
    if inputs.llamacpp_reason is None:
        run("llamacpp", lambda: backends.llamacpp_generate(inputs.gguf, texts, s.max_tokens, inputs.stops))
    else:
        runtimes["llamacpp"] = {"status": "skipped", "reason": inputs.llamacpp_reason}
    if inputs.ollama is not None:
        run("ollama", lambda: inputs.ollama(prompts, s.max_tokens))
    else:
        runtimes["ollama"] = {"status": "skipped", "reason": "the model is not deployed to Ollama"}

    verdicts = _gates(inputs, backends, prompts, answers, runtimes, skipped, tokenizer, log)
    served = "ollama" if "ollama" in answers else "llamacpp" if "llamacpp" in answers else None
    return EvalOutcome(prompts, answers, runtimes, verdicts, skipped, served)


def _gates(
    inputs: EvalInputs,
    backends: Backends,
    prompts: list[EvalPrompt],
    answers: dict[str, list[Answer]],
    runtimes: dict[str, dict[str, Any]],
    skipped: dict[str, str],
    tokenizer: Any,
    log: Log,
) -> list[Verdict]:
    s = inputs.settings
    tuned = {k: v for k, v in answers.items() if k in TUNED}
    failed = {k: v["reason"] for k, v in runtimes.items() if v["status"] == "failed"}
    end_ids = {i for i in (tokenizer.convert_tokens_to_ids(t) for t in inputs.stops) if isinstance(i, int)}
    if getattr(tokenizer, "eos_token_id", None) is not None:
        end_ids.add(tokenizer.eos_token_id)
    # q8_0 drifts from the f32 reference (LOGPROB_TOLERANCE notes): GGUF runtimes' greedy parity is reported,
    # not required, for quantized exports.
    gguf_required = s.text_agreement if inputs.gguf_type in ("f16", "f32") else 0.0
    thresholds = {"mlx_fused": s.text_agreement}
    for name in ("llamacpp", "ollama"):
        if runtimes[name]["status"] != "skipped":
            thresholds[name] = gguf_required
    verdicts = [
        parity.output_parity(
            answers, reference=REFERENCE, thresholds=thresholds, end_ids=end_ids, errors=failed
        )
    ]

    train = [i for i, p in enumerate(prompts) if p.kind == "train"]
    if "mlx_base" in answers:
        verdicts.append(
            parity.adapter_effect(
                [answers["mlx_base"][i] for i in train],
                {k: [v[i] for i in train] for k, v in tuned.items()},
                [prompts[i].reference for i in train],
                min_changed=s.min_changed,
                min_score=s.min_train_score,
            )
        )
    else:
        verdicts.append(
            Verdict(
                "adapter_effect", False, None, s.min_train_score, f"no base answers: {failed.get('mlx_base')}"
            )
        )
    verdicts.append(parity.clean_endings(tuned, max_tokens=s.max_tokens, markers=inputs.stops))
    if failed_tuned := {k: v for k, v in failed.items() if k in TUNED}:
        verdicts[-1] = Verdict("clean_endings", False, None, 1.0, f"runtimes failed: {failed_tuned}")

    if inputs.llamacpp_reason is not None:
        for name in ("tokenizer_parity", "logprob_parity"):
            skipped[name] = f"llama.cpp unavailable: {inputs.llamacpp_reason}"
        return verdicts
    texts = [*SAMPLE_TEXTS, *(p.prompt for p in prompts[:4])]
    hf_ids = [list(tokenizer.encode(t)) for t in texts]
    log("[evaluate] tokenizer parity (llama.cpp) ...")
    try:
        gguf_ids: Any = backends.llamacpp_tokenize(inputs.gguf, texts)
    except Exception as exc:
        gguf_ids = exc
    verdicts.append(parity.tokenizer_gate(texts, hf_ids, gguf_ids))

    tol = LOGPROB_TOLERANCE.get(inputs.gguf_type, LOGPROB_TOLERANCE["f16"])
    log("[evaluate] logprob parity (llama.cpp vs fused MLX) ...")
    try:
        fused = answers["mlx_fused"]
        ids: list[int] = []
        for p, a in list(zip(prompts, fused, strict=True))[: s.logprob_prompts]:
            ids += list(tokenizer.encode(p.prompt + a.text))
        reference = np.asarray(backends.mlx_logprobs(inputs.fused_dir, ids))
        candidate = backends.llamacpp_logprobs(inputs.gguf, ids, s.top_k)
        result: Any = logprob_parity(
            reference, candidate, max_abs=tol["max_abs"], tie_margin=tol["tie_margin"]
        )
    except Exception as exc:
        result = exc
    verdicts.append(parity.logprob_gate(result, gguf_type=inputs.gguf_type, max_abs=tol["max_abs"]))
    return verdicts


# ---------------------------------------------------------------- real backends


def mlx_generate(
    model_dir: Path, adapter_dir: Path | None, prompts: Sequence[str], max_tokens: int
) -> list[Answer]:
    """Greedy answers with mlx_lm; generation ends at the tokenizer's EOS ids (the chat end token)."""
    import mlx.core as mx
    from mlx_lm import load, stream_generate

    model, tokenizer = load(str(model_dir), adapter_path=str(adapter_dir) if adapter_dir else None)
    model.eval()
    out = []
    for prompt in prompts:
        text, tokens, reason, n_prompt = "", [], "length", None
        for r in stream_generate(model, tokenizer, prompt, max_tokens=max_tokens):
            text += r.text
            tokens.append(int(r.token))
            reason, n_prompt = r.finish_reason or reason, r.prompt_tokens
        out.append(Answer(text, reason, tokens, n_prompt))
    del model
    mx.clear_cache()
    return out


def mlx_logprobs(model_dir: Path, token_ids: Sequence[int]) -> np.ndarray:
    from finetune.llamacpp import MlxReference

    return MlxReference(model_dir).logprobs(token_ids)


def llamacpp_generate(
    gguf: Path, prompts: Sequence[str], max_tokens: int, stops: Sequence[str]
) -> list[Answer]:
    from finetune import llamacpp

    return [
        Answer(g.text, g.finish_reason, list(g.tokens))
        for g in llamacpp.generate(gguf, prompts, max_tokens, stops)
    ]


def llamacpp_tokenize(gguf: Path, texts: Sequence[str]) -> list[list[int]]:
    from finetune import llamacpp

    return llamacpp.tokenize(gguf, texts)


def llamacpp_logprobs(gguf: Path, token_ids: Sequence[int], k: int) -> list[dict[int, float]]:
    from finetune import llamacpp

    return llamacpp.top_logprobs(gguf, token_ids, k=k)


def ollama_answers(client: Any, model: str, prompts: Sequence[EvalPrompt], max_tokens: int) -> list[Answer]:
    """The user message through the served TEMPLATE, greedy; stop strings come from the Modelfile."""
    out = []
    for p in prompts:
        r = client.generate(
            model=model, prompt=p.question, options={"temperature": 0, "seed": 0, "num_predict": max_tokens}
        )
        reason = r.get("done_reason") if isinstance(r, dict) else getattr(r, "done_reason", None)
        text = r["response"]
        n_prompt = (
            r.get("prompt_eval_count") if isinstance(r, dict) else getattr(r, "prompt_eval_count", None)
        )
        # An unexpected done_reason is kept as is, so the clean-endings gate shows it instead of hiding it.
        out.append(
            Answer(text, reason if reason in ("stop", "length") else f"unknown:{reason}", None, n_prompt)
        )
    return out


def real_backends() -> Backends:
    from finetune.runner import load_tokenizer

    return Backends(
        load_tokenizer=load_tokenizer,
        mlx_generate=mlx_generate,
        mlx_logprobs=mlx_logprobs,
        llamacpp_generate=llamacpp_generate,
        llamacpp_tokenize=llamacpp_tokenize,
        llamacpp_logprobs=llamacpp_logprobs,
    )
