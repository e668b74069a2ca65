"""`finetune export RUN --as gguf:TYPE`: the run's fused model quantized by the quantizer Ollama users have, judged
against the f16 GGUF of the same fused model in llama.cpp on held-out text (finetune.gates.quant_quality), its
tensor types checked (quant_types), and its decode speed measured in llama.cpp and Ollama, so a user picks a
format on evidence (README: "Shipping a quantized GGUF")."""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from finetune import faults
from finetune.errors import UserError
from finetune.evaluate.general_text import GENERAL_TEXTS
from finetune.system.jsonl import read_jsonl

HELDOUT_ROWS = 8  # rows of the run's test split, beside the general texts no run trains on
HELDOUT_TOKENS = 128
SCORED = 8  # training and held-out questions each


def heldout_ids(run_dir: Path, tokenizer: Any) -> list[list[int]]:
    """General text and the run's own test split (never trained on), as token ids, each cut at 128 tokens."""
    test = Path(run_dir) / "data" / "test.jsonl"
    texts = [
        *GENERAL_TEXTS,
        *(r["text"] for r in (read_jsonl(test) if test.is_file() else [])[:HELDOUT_ROWS]),
    ]
    ids = [list(tokenizer.encode(t))[:HELDOUT_TOKENS] for t in texts]
    return [x for x in ids if len(x) >= 2]


def gguf_quantized(job: Any, qtype: str) -> tuple[Path, list[Any], dict[str, Any]]:
    """job: a finetune.recipes.export_adapter.Job. Ships out/model-<qtype>.gguf."""
    from finetune.evaluate.quant_measure import measure_quantized
    from finetune.export.gguf import convert_hf_to_gguf
    from finetune.export.gguf_inspect import inspect_gguf
    from finetune.export.quant_types import check_quant_types
    from finetune.gates.quant_quality import limits_from, quant_answers, quant_quality, quant_types
    from finetune.serve.ollama_quantize import quantize_gguf

    binary = _ollama(job, qtype)
    job.out.mkdir(parents=True, exist_ok=True)
    shipped = job.out / f"model-{qtype}.gguf"
    with tempfile.TemporaryDirectory(prefix=".quantize.", suffix=".tmp", dir=job.out) as tmp:
        reference = _reference(job, Path(tmp), convert_hf_to_gguf)
        source = faults.point(
            "quant_of_base",
            reference,
            lambda: convert_hf_to_gguf(job.base, Path(tmp) / "base-f16.gguf", "f16"),
        )
        q = quantize_gguf(source, shipped, qtype, binary=binary, speed=job.speed)
        problems = check_quant_types(shipped, qtype, reference)
        ids, questions = heldout_ids(job.run_dir, job.tokenizer), scored_questions(job)
        ref_rows, ref_scores = _reference_measured(job, reference, ids, questions)
        m = measure_quantized(reference, shipped, ids, reference_rows=ref_rows)
        speed = _llamacpp_speed(shipped) if job.speed else None  # else measured later, nothing beside
        scores = answer_scores(job, {qtype: shipped}, questions)
        if isinstance(questions, Questions):
            served = _served_scores(job, binary, shipped, questions.prompts)
            scores = {"f16": ref_scores, **scores, f"ollama {qtype}": served}
        reference_bytes = reference.stat().st_size
    verdicts = [
        quant_types(problems, qtype, len(inspect_gguf(shipped).tensors)),
        quant_quality(m, qtype, limits_from(job.cfg.gates)),
        quant_answers(scores, qtype, job.cfg.gates.quant_answers_kept),
    ]
    extra = {
        "quantized": {
            "type": qtype,
            **m.to_dict(),
            "f16_bytes": reference_bytes,
            "quantize_seconds": round(q.seconds, 2),
            "llamacpp_tokens_per_second": speed,
            "ollama_tokens_per_second": q.ollama_tokens_per_second,
            "scores": scores,
        }
    }
    return shipped, verdicts, extra


def measure_speeds(job: Any, gguf: Path, qtype: str) -> dict[str, float | None]:
    """A quantized GGUF's decode tokens/s in llama.cpp and in Ollama (served FROM the file), for a moment when
    nothing runs beside (the pipeline ships its forms side by side: speeds measured then would be shared)."""
    from finetune.serve.ollama_quantize import served_speed

    kw = {} if job.ollama_server is None else {"server": job.ollama_server}
    return {
        "llamacpp_tokens_per_second": _llamacpp_speed(gguf),
        "ollama_tokens_per_second": served_speed(gguf, binary=_ollama(job, qtype), **kw),
    }


def _llamacpp_speed(gguf: Path) -> float | None:
    from finetune.serve import llamacpp
    from finetune.serve.ollama_quantize import SPEED_PROMPT, SPEED_TOKENS

    return llamacpp.generate(gguf, [SPEED_PROMPT], max_tokens=SPEED_TOKENS)[0].tokens_per_second


@dataclass(frozen=True)
class Questions:
    """SCORED training and held-out questions as llama.cpp is asked them: the training template's prompts, its
    stop strings and the data's answer budget."""

    prompts: list[Any]
    stops: list[str]
    tokens: int


def scored_questions(job: Any) -> Questions | str:
    """The questions every runtime of a quantized export is asked, built once; a str says why there are none."""
    from finetune.data.templates import get_template
    from finetune.evaluate.budget import answer_budget
    from finetune.evaluate.prompts import build_prompts

    template = get_template(job.cfg.data.template, tokenizer=job.tokenizer)
    try:
        prompts = build_prompts(job.run_dir / "data", template, n_train=SCORED, n_heldout=SCORED)
    except ValueError as exc:  # raw-text rows: no questions to ask
        return str(exc)
    return Questions(
        prompts, list(template.stop_strings), answer_budget(job.run_dir / "data", job.tokenizer).tokens
    )


def answer_scores(
    job: Any, ggufs: dict[str, Path], questions: Questions | str | None = None
) -> dict[str, Any]:
    """Share of SCORED training and held-out questions each GGUF answers right in llama.cpp (greedy, the training
    template's prompt): what the fine-tune learned, kept or lost by the quantization."""
    from finetune.serve import llamacpp

    q = scored_questions(job) if questions is None else questions
    if isinstance(q, str):
        return {"skipped": q}
    return {
        name: _right([a.text for a in llamacpp.generate(path, [p.prompt for p in q.prompts], q.tokens, q.stops)],
                     q.prompts)
        for name, path in ggufs.items()
    }  # fmt: skip


def _right(answers: list[str], prompts: list[Any]) -> dict[str, float | None]:
    from finetune.gates.scoring import is_right

    out: dict[str, float | None] = {}
    for kind in ("train", "heldout"):
        right = [is_right(a, p.reference) for a, p in zip(answers, prompts, strict=True) if p.kind == kind]
        out[kind] = sum(right) / len(right) if right else None
    return out


def _served_scores(job: Any, binary: Path, shipped: Path, prompts: list[Any]) -> dict[str, float | None]:
    """The quantized model as Ollama users run it: the shipped Modelfile (FROM the file, the run's TEMPLATE and
    PARAMETERs), default /api/chat requests, the same questions as answer_scores."""
    from finetune.evaluate.served_adapter import adapter_modelfile, ask_served
    from finetune.system.atomic import atomic_write_text

    modelfile = job.out / "Modelfile"
    atomic_write_text(
        modelfile, adapter_modelfile(job.cfg, job.run_dir, job.tokenizer, job.base, shipped, None, job.out)
    )
    served = ask_served(binary, job.out, {"quantized": modelfile}, {"scored": prompts}, job.ollama_server)
    return _right(served["quantized"]["scored"], prompts)


def _ollama(job: Any, qtype: str) -> Path:
    location = job.locate_ollama()
    if location.binary is None:
        raise UserError(
            f"--as gguf:{qtype} quantizes with Ollama's quantizer, and none was found: {location.reason}"
        )
    return Path(location.binary)


def _fused(job: Any, tmp: Path) -> Path:
    """The pipeline's fused folder (judged by fuse_exactness) when the run has one, else a fresh fuse in float32."""
    from finetune.export.fuse import fuse

    judged = job.run_dir / "fused"
    if (judged / "config.json").is_file():
        return judged
    return fuse(job.base, job.adapter, tmp / "fused", dtype="float32")


def _reference(job: Any, tmp: Path, convert: Any) -> Path:
    """The f16 GGUF of the fused model: the pipeline's own (judged by logprob_parity) when the run shipped f16,
    else converted here."""
    judged = job.run_dir / "gguf" / "model-f16.gguf"
    if judged.is_file() and (job.run_dir / "fused" / "config.json").is_file():
        return judged
    return convert(_fused(job, tmp), tmp / "model-f16.gguf", "f16")


def _reference_measured(
    job: Any, reference: Path, ids: list[list[int]], questions: Questions | str
) -> tuple[list, dict | None]:
    """The f16 GGUF's rows on the held-out texts and its answer scores, measured once per content (sha256 of the
    GGUF, the texts and the llama.cpp build) and kept under RUN/export/.cache for the next type exported."""
    from importlib.metadata import version

    from finetune.evaluate.quant_measure import TOP_K, rows_from_json
    from finetune.serve.llamacpp import scored_logprobs
    from finetune.system.atomic import atomic_write_json
    from finetune.system.hashing import file_sha256, json_sha256

    data = [file_sha256(f) for f in sorted((job.run_dir / "data").glob("*.jsonl"))]  # the scored questions
    key = json_sha256([file_sha256(reference), ids, data, TOP_K, SCORED, version("xllamacpp")])
    cached = job.run_dir / "export" / ".cache" / f"f16-{key[:24]}.json"
    if cached.is_file():
        saved = json.loads(cached.read_text())
        return rows_from_json(saved["rows"]), saved["scores"]
    rows = scored_logprobs(reference, ids, k=TOP_K)
    scores = answer_scores(job, {"f16": reference}, questions).get("f16")
    cached.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_json(cached, {"rows": rows, "scores": scores})
    return rows, scores
