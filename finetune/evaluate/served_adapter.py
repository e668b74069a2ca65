"""The GGUF LoRA as Ollama users run it: a Modelfile `FROM` the base GGUF with `ADAPTER` (the run's chat TEMPLATE,
stop strings and PARAMETERs, as the pipeline's own Modelfile has them), created in a private server and asked
with default /api/chat requests; its answers to training questions against MLX base + the trained adapter's."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from finetune.gates.parity import agrees

PROBES = 8  # training questions asked
NAME = "adapter-export"


class NoQuestions(ValueError):
    """The run's data are raw text: there is no conversation to send to /api/chat."""


@dataclass(frozen=True)
class ServedAdapterMeasurement:
    prompts: int
    agree: int  # Ollama (base + ADAPTER) answers equal to MLX base + adapter's
    adapter_changes: int  # prompts where MLX base + adapter answers unlike the base
    served_changes: int  # of those, where Ollama's answer is not the base's either
    examples: list[dict[str, str]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def adapter_modelfile(
    cfg: Any, run_dir: Path, tokenizer: Any, base_dir: Path, base_gguf: Path, lora: Path | None, out: Path
) -> str:
    """The Modelfile users create the model from: base_gguf (+ the adapter), the run's chat format and PARAMETERs
    (paths relative to out, where it ships); tokenizer: the base's, which the caller has loaded."""
    from finetune.evaluate.budget import answer_budget
    from finetune.serve.modelfile import modelfile_parts, render_modelfile

    model_config = json.loads((base_dir / "config.json").read_text())
    parts = modelfile_parts(
        cfg, tokenizer, model_config, answer_budget(run_dir / "data", tokenizer).serve_tokens
    )
    return render_modelfile(base_gguf, adapter=lora, template=parts.template, stop=parts.stops,
                            parameters=parts.parameters, system=parts.system, relative_to=out)  # fmt: skip


@dataclass(frozen=True)
class Probes:
    """A run's training questions with MLX's greedy answers, base and base + the trained adapter."""

    prompts: list[Any]  # EvalPrompt
    base: list[Any]  # Answer
    tuned: list[Any]

    @property
    def changed(self) -> list[int]:
        return [i for i, (b, t) in enumerate(zip(self.base, self.tuned, strict=True)) if b.text != t.text]


def mlx_probes(cfg: Any, run_dir: Path, base_dir: Path, adapter_dir: Path) -> Probes:
    from transformers import AutoTokenizer

    from finetune.data.templates import get_template
    from finetune.evaluate import decode
    from finetune.evaluate.budget import answer_budget
    from finetune.evaluate.prompts import build_prompts

    tokenizer = AutoTokenizer.from_pretrained(str(base_dir))
    template = get_template(cfg.data.template, tokenizer=tokenizer)
    try:
        prompts = build_prompts(run_dir / "data", template, n_train=PROBES, n_heldout=0)
    except ValueError as exc:  # raw-text rows
        raise NoQuestions(f"no training questions to ask the served model: {exc}") from None
    tokens = answer_budget(run_dir / "data", tokenizer).tokens
    texts = [p.prompt for p in prompts]
    base, tuned = (decode.answers_from_disk(base_dir, a, texts, tokens) for a in (None, adapter_dir))
    return Probes(prompts, base, tuned)


def ask_served(
    binary: Path,
    folder: Path,
    modelfiles: dict[str, Path],
    questions: dict[str, list[Any]],
    server: Callable[..., Any] | None = None,
) -> dict[str, dict[str, list[str]]]:
    """One private Ollama (its store in a temporary folder under `folder`), a model created from each Modelfile,
    each model asked every question set with default requests: {model key: {set key: answers}}."""
    import re
    import tempfile

    if server is None:
        from finetune.serve.ollama_server import OllamaServer as server
    # Ollama's naming rules: a run folder named "My Run" still serves
    names = {k: f"ft-{i}-" + re.sub(r"[^a-z0-9._-]+", "-", k.lower()) for i, k in enumerate(modelfiles)}
    with (
        tempfile.TemporaryDirectory(prefix=".ollama.", suffix=".tmp", dir=folder) as tmp,
        server(binary, tmp) as srv,
    ):
        for key, modelfile in modelfiles.items():
            srv.create_model(names[key], modelfile)
        client = srv.client()
        return {k: {q: served_answers(client, names[k], p) for q, p in questions.items()} for k in modelfiles}


def served_answers(client: Any, model: str, prompts: list[Any]) -> list[str]:
    """Default /api/chat requests (the Modelfile's PARAMETERs decide, as for users); the answers' text."""
    return [
        client.chat(model=model, messages=[dict(m) for m in p.messages])["message"]["content"]
        for p in prompts
    ]


def compare(probes: Probes, served: list[str]) -> ServedAdapterMeasurement:
    return ServedAdapterMeasurement(
        prompts=len(probes.prompts),
        agree=sum(_same(s, t) for s, t in zip(served, probes.tuned, strict=True)),
        adapter_changes=len(probes.changed),
        served_changes=sum(served[i].strip() != probes.base[i].text for i in probes.changed),
        examples=[
            {"question": p.question, "mlx_adapter": t.text, "ollama_adapter": s, "mlx_base": b.text}
            for p, b, t, s in list(zip(probes.prompts, probes.base, probes.tuned, served, strict=True))[:3]
        ],
    )


def measure_served_adapter(
    cfg: Any,
    run_dir: Path,
    base_dir: Path,
    adapter_dir: Path,
    modelfile: Path,
    *,
    binary: Path,
    server: Callable[..., Any] | None = None,
) -> ServedAdapterMeasurement:
    """Ollama's default-request answers from the adapter model vs MLX's greedy answers, base and base + adapter."""
    probes = mlx_probes(cfg, run_dir, base_dir, adapter_dir)
    served = ask_served(binary, modelfile.parent, {NAME: modelfile}, {"training": probes.prompts}, server)
    return compare(probes, served[NAME]["training"])


def _same(served: str, reference: Any) -> bool:
    """Equal answers; where MLX stopped at its token budget (Ollama's num_predict is the serve budget, larger),
    Ollama's answer must begin with MLX's."""
    return agrees(served.strip(), reference.text.strip(), reference)
