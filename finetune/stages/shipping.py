"""The stages that ship the adapter: fuse -> gguf -> ollama -> evaluate (`finetune pipeline`, after finetune.stages.training)."""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from finetune import faults
from finetune.evaluate import base_answers
from finetune.export.fuse_check import config_changes
from finetune.gates import fuse as fuse_gate
from finetune.gates import served
from finetune.gates.generalization import heldout_score
from finetune.gates.provenance import explain
from finetune.gates.registry import RUNTIME_OF
from finetune.gates.runtime_parity import judge_runtimes
from finetune.gates.verdict import Verdict
from finetune.models.cache import cache_root
from finetune.models.safetensors import dtype_counts
from finetune.report.artifacts import artifact
from finetune.report.models import StageReport
from finetune.stages.context import Ctx, Stage, StageError
from finetune.system.atomic import atomic_write_json
from finetune.system.jsonl import read_jsonl

FUSE_DTYPE = "float32"  # keeps small LoRA deltas that bf16 would round away


def stage_fuse(ctx: Ctx) -> StageReport:
    out = ctx.run_dir / "fused"
    base, adapter = Path(ctx.outputs["model"]["path"]), Path(ctx.outputs["train"]["adapter_dir"])
    ctx.deps.fuse(base, adapter, out, dtype=FUSE_DTYPE)
    config = json.loads((out / "config.json").read_text())
    problems = [f"config.json has {k}" for k in ("quantization", "quantization_config") if k in config]
    problems += config_changes(ctx.outputs["model"]["config"], config)  # the same model, but for its dtype
    dtypes = dtype_counts(out)
    if not dtypes:
        problems.append("no *.safetensors weights")
    if set(dtypes) - {"F32"}:
        problems.append(f"weights are not all float32: {dtypes}")
    if problems:  # never re-quantize (or round) silently: the GGUF export must start from full precision
        raise StageError(
            f"{out}: the fused model is not the base's in full precision: {'; '.join(problems)}",
            {"dtypes": dtypes},
        )
    verdicts = []
    if ctx.wants("fuse_exactness"):
        if ctx.cfg.training.fine_tune_type == "lora":
            m = ctx.deps.measure_fuse(base, adapter, out)
            verdicts.append(explain(fuse_gate.fuse_exactness(m, max_rel=ctx.cfg.gates.fuse_max_rel), out))
        else:
            from finetune.gates.verdict import skipped

            verdicts.append(
                skipped("fuse_exactness", f"{ctx.cfg.training.fine_tune_type}: no LoRA delta to check")
            )
    return StageReport(
        outputs={"fused_dir": str(out)},
        artifacts=[artifact("fused_model", out)],
        details={"dtypes": dtypes},
        verdicts=verdicts,
    )


def stage_gguf(ctx: Ctx) -> StageReport:
    outtype = ctx.cfg.export.gguf_type
    fused = Path(ctx.outputs["fuse"]["fused_dir"])
    path = ctx.run_dir / "gguf" / f"model-{outtype}.gguf"
    ctx.deps.export_gguf(fused, path, outtype)
    problems = ctx.deps.check_gguf(path, fused)  # architecture, tensors and shapes, metadata
    details = {"outtype": outtype, "problems": problems}
    if problems:
        raise StageError(f"{path}: {len(problems)} problem(s): {'; '.join(problems[:5])}", details)
    return StageReport(
        outputs={"gguf": str(path), "outtype": outtype}, artifacts=[artifact("gguf", path)], details=details
    )


def _check(c: Any) -> dict[str, Any]:
    return {"name": c.name, "passed": bool(c.passed), "detail": str(c.detail)}


def _modelfile(ctx: Ctx, gguf: Path) -> tuple[str, dict[str, Any]]:
    """The Modelfile's text for this run's GGUF, and what it was meant to hold (TEMPLATE, stop strings and
    PARAMETERs training needs, derived apart from the text written, and the data's answer budget)."""
    from finetune.evaluate.budget import answer_budget
    from finetune.serve.modelfile import chat_format, modelfile_parts, render_modelfile, served_chat

    tokenizer = ctx.deps.load_tokenizer(Path(ctx.outputs["model"]["path"]))
    deploy = ctx.cfg.deploy
    budget = answer_budget(Path(ctx.outputs["data"]["data_dir"]), tokenizer)
    parts = modelfile_parts(ctx.cfg, tokenizer, ctx.outputs["model"]["config"], budget.serve_tokens)
    template, stops, params = parts.template, parts.stops, parts.parameters
    # the stop strings the training format justifies; a user's deploy.stop beyond them fails served_template
    # (only with a user's own deploy.template are the user's stops the expectation)
    own = deploy if deploy.template is not None else deploy.model_copy(update={"stop": []})
    justified = served_chat(ctx.cfg.data.template, own, tokenizer)[1]
    written = faults.point("modelfile_short_num_predict", params, budget.longest_answer)
    written = faults.point("modelfile_no_temperature", written)
    written_stops = faults.point("modelfile_extra_stop", faults.point("modelfile_no_stop", stops))
    text = render_modelfile(
        gguf,
        template=faults.point("modelfile_wrong_template", template, chat_format),
        stop=written_stops,
        parameters=written,
        system=parts.system,
        relative_to=ctx.session.folder,
    )
    meant = {
        "expected_template": template,
        "expected_stops": list(justified),
        "parameters": params,
        "budget": budget.to_dict(),
        "trained_context": ctx.cfg.data.max_seq_length,
        "model_context": parts.model_context,
    }
    return text, meant


def _shown(server: Any, name: str, field: str) -> str:
    """A field of what `ollama show` reports (a dict or an object, by client version)."""
    shown = server.show(name)
    return (shown.get(field) if isinstance(shown, dict) else getattr(shown, field, None)) or ""


def stage_ollama(ctx: Ctx) -> StageReport:
    from finetune.serve.deploy import shown_parameters

    location = ctx.deps.locate_ollama()
    if location.binary is None:
        reason = f"no Ollama binary: {location.reason}"
        return StageReport(
            outputs={"deployed": False, "reason": reason}, status="skipped", reason=reason, record=False
        )
    gguf, name = Path(ctx.outputs["gguf"]["gguf"]), ctx.cfg.deploy.model_name
    text, meant = _modelfile(ctx, gguf)
    try:
        server = ctx.session.start(location.binary)
    except Exception as exc:  # Ollama cannot run here: the run is degraded, loudly in the report
        reason = f"ollama serve could not start ({location.binary}): {type(exc).__name__}: {exc}"
        return StageReport(
            outputs={"deployed": False, "reason": reason}, status="skipped", reason=reason, record=False
        )
    result = ctx.deps.deploy(server, name, gguf, text, ctx.session.folder)
    ctx.session.models.add(name)
    details: dict[str, Any] = {
        "binary": str(location.binary),
        "version": getattr(server, "version", None),
        "model": name,
        "modelfile": str(result.modelfile_path),
        "deploy_checks": [_check(c) for c in result.checks],
    }
    fatal = [
        c.name for c in result.checks if not c.passed and c.name in ("modelfile", "create", "show", "listed")
    ]
    if fatal:
        raise StageError(f"Ollama could not serve the model: {', '.join(fatal)} failed", details)
    shown_template, params_text = _shown(server, name, "template"), _shown(server, name, "parameters")
    first = read_jsonl(Path(ctx.outputs["data"]["data_dir"]) / "train.jsonl")[0]
    question = first["conversation"][-2]["content"] if first.get("conversation") else first["text"][:200]
    checks = ctx.deps.served_checks(server.client(), name, question)
    details["served_checks"] = [_check(c) for c in checks]
    verdicts = [explain(served.served_api(checks))] if ctx.wants("served_api") else []
    modelfile = Path(result.modelfile_path)
    outputs = {
        "deployed": True,
        "binary": str(location.binary),
        "model": name,
        "modelfile": str(modelfile),
        "shown_template": shown_template,
        "shown_stops": shown_parameters(params_text).get("stop", []),
        "shown_parameters": {k: v for k, v in shown_parameters(params_text).items() if k != "stop"},
        **meant,
    }
    return StageReport(
        outputs=outputs, artifacts=[artifact("modelfile", modelfile)], details=details, verdicts=verdicts
    )


def _ollama_runtime(ctx: Ctx, ollama_out: dict[str, Any], probe: dict[str, Any]) -> Callable[..., list[Any]]:
    """The served model as an evaluation runtime: default /api/chat requests, then the first conversation as an
    OpenAI client asks it (into `probe`)."""
    from finetune.evaluate.prompts import EvalPrompt

    binary, name, modelfile = Path(ollama_out["binary"]), ollama_out["model"], Path(ollama_out["modelfile"])

    def ollama(prompts: Sequence[EvalPrompt]) -> list[Any]:
        server = ctx.session.ensure_model(binary, name, modelfile)
        answers = ctx.deps.ollama_answers(server, name, prompts)
        first = [dict(m) for m in prompts[0].messages] or [{"role": "user", "content": prompts[0].question}]
        try:
            probe["openai"] = ctx.deps.openai_answers(server, name, first)
        except Exception as exc:  # served_defaults fails without it, saying why
            probe["openai_error"] = f"{type(exc).__name__}: {exc}"
        return answers

    return ollama


def stage_evaluate(ctx: Ctx) -> StageReport:
    from finetune.data.templates import get_template
    from finetune.evaluate.budget import answer_budget
    from finetune.evaluate.evaluation import EvalInputs, EvalSettings, score_runtimes
    from finetune.export.gguf_inspect import config_context_length

    ollama_out = ctx.outputs.get("ollama", {})
    probe: dict[str, Any] = {}  # what the OpenAI-compatible endpoint answered
    ollama = _ollama_runtime(ctx, ollama_out, probe) if ollama_out.get("deployed") else None
    tokenizer = ctx.deps.load_tokenizer(Path(ctx.outputs["model"]["path"]))
    settings = ctx.settings or EvalSettings()
    budget = answer_budget(Path(ctx.outputs["data"]["data_dir"]), tokenizer)
    inputs = EvalInputs(
        base_dir=Path(ctx.outputs["model"]["path"]),
        adapter_dir=Path(ctx.outputs["train"]["adapter_dir"]),
        fused_dir=Path(ctx.outputs["fuse"]["fused_dir"]),
        gguf=Path(ctx.outputs["gguf"]["gguf"]),
        gguf_type=ctx.outputs["gguf"]["outtype"],
        data_dir=Path(ctx.outputs["data"]["data_dir"]),
        template=ctx.cfg.data.template,
        stops=get_template(ctx.cfg.data.template, tokenizer=tokenizer).stop_strings,
        max_tokens=settings.max_tokens or budget.tokens,
        settings=settings,
        llamacpp_reason=ctx.deps.llamacpp_reason(),
        ollama=ollama,
        ollama_reason=ollama_out.get("reason", "the model is not deployed to Ollama"),
        model_context=config_context_length(ctx.outputs["model"]["config"]),
        cache_dir=ctx.run_dir / "eval" / "logprobs",
        base_answers_dir=cache_root() / base_answers.FOLDER,  # the base is shared by every run of it
    )
    m = ctx.deps.evaluate(inputs, ctx.log)
    verdicts = _runtime_verdicts(ctx, m, inputs.gguf)
    if "ollama" in m.answers:
        verdicts += _served_verdicts(ctx, m, ollama_out, probe)
    results = {
        "prompts": [p.__dict__ | {"messages": list(p.messages)} for p in m.prompts],
        "answers": {k: [a.to_dict() for a in v] for k, v in m.answers.items()},
        "runtimes": m.runtimes,
        "scores": score_runtimes(m.prompts, m.answers),
    }
    path = ctx.run_dir / "eval" / "results.json"
    atomic_write_json(path, results)
    details = {
        "runtimes": m.runtimes,
        "scores": results["scores"],
        "budget": budget.to_dict() | {"used": inputs.max_tokens},
        **probe,
    }
    # a runtime that crashed (e.g. its server died) fails its gates now, but is asked again on the next run
    crashed = any(r.get("status") == "failed" for r in m.runtimes.values())
    return StageReport(
        outputs={"scores": results["scores"]},
        artifacts=[artifact("eval_results", path)],
        details=details,
        verdicts=verdicts,
        record=not crashed,
    )


def _runtime_verdicts(ctx: Ctx, m: Any, gguf: Path) -> list[Verdict]:
    """The runtimes against each other and the base (parity, effect, endings, held-out questions)."""
    verdicts = [
        explain(v, gguf if RUNTIME_OF.get(v.name) == "llamacpp" else None)  # llama.cpp reads the GGUF
        for v in judge_runtimes(m, ctx.cfg.gates)
        if ctx.wants(v.name)
    ]
    if ctx.wants("heldout_score"):
        threshold = ctx.cfg.gates.heldout_min_score
        verdicts.append(explain(heldout_score(m.prompts, m.answers, threshold=threshold)))
    return verdicts


def _served_verdicts(ctx: Ctx, m: Any, ollama_out: dict[str, Any], probe: dict[str, Any]) -> list[Verdict]:
    """Ollama's default-request answers, rendered prompts and PARAMETERs against what training needs and
    what was judged (served_answers, served_template, served_defaults)."""
    verdicts = []
    train = [i for i, p in enumerate(m.prompts) if p.kind == "train"]
    modelfile = Path(ollama_out["modelfile"])
    if ctx.wants("served_answers") and "mlx_adapter" in m.answers:
        v = served.served_answers(
            [m.answers["ollama"][i] for i in train],
            [m.answers["mlx_adapter"][i] for i in train],
            [m.prompts[i].reference for i in train],
            threshold=ctx.cfg.gates.text_agreement,
        )
        verdicts.append(explain(v))
    if ctx.wants("served_template"):
        prompts = {
            "training_ids": m.training_prompt_ids,
            "served_ids": m.served_prompt_ids,
            "served_counts": [a.prompt_tokens for a in m.answers["ollama"]],
            "tokenizer": m.served_ids_tokenizer,
        }
        v = served.served_template(
            ollama_out["shown_template"],
            ollama_out["shown_stops"],
            ollama_out["expected_template"],
            ollama_out["expected_stops"],
            prompts,
        )
        verdicts.append(explain(v, modelfile))
    if ctx.wants("served_defaults"):
        v = served.served_defaults(
            ollama_out["shown_parameters"],
            ollama_out["parameters"],
            trained_context=ollama_out["trained_context"],
            model_context=ollama_out["model_context"],
            longest_answer=ollama_out["budget"]["longest_answer"],
            api_answers=m.answers["ollama"],
            openai=probe.get("openai"),
        )
        if "openai_error" in probe:
            v.detail += f"; /v1: {probe['openai_error']}"
        verdicts.append(explain(v, modelfile))
    return verdicts


def evaluate_inputs(ctx: Ctx) -> dict[str, Any]:
    return {
        "settings": ctx.settings.to_dict() if ctx.settings else None,
        **ctx.section("data", "deploy", "gates"),
        "ollama_deployed": bool(ctx.outputs.get("ollama", {}).get("deployed")),
        "llamacpp": ctx.deps.llamacpp_reason(),
        **ctx.upstream("model", "data", "train", "fuse", "gguf", "ollama"),
    }


FUSE = Stage(
    "fuse",
    stage_fuse,
    lambda ctx: {"dtype": FUSE_DTYPE, **ctx.section("gates"), **ctx.upstream("model", "train")},
)
GGUF = Stage("gguf", stage_gguf, lambda ctx: {**ctx.section("export"), **ctx.upstream("fuse")})
# the binary by its version (finetune.stages.keys), not its path
OLLAMA = Stage("ollama", stage_ollama, lambda ctx: {**ctx.section("deploy", "data"), **ctx.upstream("gguf")})
EVALUATE = Stage("evaluate", stage_evaluate, evaluate_inputs)
