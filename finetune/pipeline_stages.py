"""The tier 3 pipeline's stages: each a plain function of a Ctx that writes into the run directory.

Order and inputs: STAGES and stage_inputs (config sections + the digests of the stages each one reads).
"""

from __future__ import annotations

import json
import shutil
import struct
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from finetune.config import RunConfig, save_config
from finetune.evaluate import EvalInputs, EvalPrompt
from finetune.pipeline_deps import ALLOW_NO_RUNTIME, FUSE_DTYPE, TRAIN_DIGEST, Ctx, StageError, StageResult
from finetune.report import artifact

# ---------------------------------------------------------------- helpers


def _section(cfg: RunConfig, *names: str) -> dict[str, Any]:
    data = cfg.to_dict()
    return {n: data[n] for n in names}


def _lines(path: Path) -> int:
    return (
        sum(1 for line in path.read_text(encoding="utf-8").splitlines() if line.strip())
        if path.is_file()
        else 0
    )


def _tail(path: Path, n: int = 15) -> str:
    try:
        return "\n  ".join(path.read_text(errors="replace").splitlines()[-n:])
    except OSError:
        return "(no log)"


def safetensors_dtypes(folder: Path) -> dict[str, int]:
    """dtype -> tensor count over a folder's *.safetensors headers (8-byte length, then JSON)."""
    counts: dict[str, int] = {}
    for file in sorted(Path(folder).glob("*.safetensors")):
        with open(file, "rb") as fh:
            (n,) = struct.unpack("<Q", fh.read(8))
            header = json.loads(fh.read(n))
        for name, info in header.items():
            if name != "__metadata__":
                counts[info["dtype"]] = counts.get(info["dtype"], 0) + 1
    return counts


# ---------------------------------------------------------------- stages


def stage_prepull(ctx: Ctx) -> StageResult:
    model = ctx.deps.resolve_model(ctx.cfg.model.name)
    outputs = {"name": model.name, "path": str(model.path), "source": model.source}
    return StageResult(outputs, [artifact("base_model", model.path)], {"source": model.source})


def stage_dataset(ctx: Ctx) -> StageResult:
    from finetune.atomic import atomic_dir

    tokenizer = ctx.deps.load_tokenizer(Path(ctx.outputs["prepull"]["path"]))
    data_dir = ctx.run_dir / "data"
    with atomic_dir(data_dir) as tmp:  # a config change must not leave another run's files behind
        ctx.deps.prepare_data(ctx.cfg, tmp, tokenizer)
    counts = {name: _lines(data_dir / f"{name}.jsonl") for name in ("train", "valid", "test", "heldout")}
    if counts["train"] == 0:
        raise StageError(f"{data_dir / 'train.jsonl'}: no training rows")
    return StageResult(
        {"data_dir": str(data_dir), "counts": counts}, [artifact("data", data_dir)], {"counts": counts}
    )


def stage_train(ctx: Ctx) -> StageResult:
    train_dir, cfg_file = ctx.run_dir / "train", ctx.run_dir / "config.yaml"
    save_config(ctx.cfg, cfg_file)
    marker, digest = train_dir / TRAIN_DIGEST, ctx.digests["train"]
    # Same inputs and a checkpoint on disk: a crashed or interrupted training continues instead of restarting.
    resume = (
        marker.is_file()
        and marker.read_text().strip() == digest
        and any((train_dir / "checkpoints").glob("*"))
    )
    if not resume and train_dir.exists():
        shutil.rmtree(train_dir)
    train_dir.mkdir(parents=True, exist_ok=True)
    marker.write_text(digest + "\n")
    args = [
        "train",
        "--config",
        str(cfg_file),
        "--run-dir",
        str(train_dir),
        *(["--resume"] if resume else []),
    ]
    log_path = ctx.run_dir / "logs" / "train.log"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    ctx.log(f"[train] finetune {' '.join(args)} (log: {log_path})")
    code = ctx.deps.train(args, log_path, ctx.log)
    if code != 0:
        raise StageError(
            f"`finetune {' '.join(args)}` exited with code {code}; end of {log_path}:\n  {_tail(log_path)}"
        )
    adapter = train_dir / "adapter"
    missing = [n for n in ("adapters.safetensors", "adapter_config.json") if not (adapter / n).is_file()]
    if missing:
        raise StageError(f"{adapter}: training finished without {', '.join(missing)}")
    # The CLI prepared its own copy of the data; it must be the dataset stage's, byte for byte.
    data_dir = Path(ctx.outputs["dataset"]["data_dir"])
    differ = [
        n
        for n in ("train.jsonl", "valid.jsonl", "test.jsonl")
        if (data_dir / n).read_bytes() != (train_dir / "data" / n).read_bytes()
    ]
    if differ:
        raise StageError(
            f"{train_dir / 'data'}: {', '.join(differ)} differ from the dataset stage's {data_dir}"
        )
    result = (
        json.loads((train_dir / "train_result.json").read_text())
        if (train_dir / "train_result.json").is_file()
        else {}
    )
    keep = (
        "steps",
        "final_train_loss",
        "initial_val_loss",
        "best_val_loss",
        "wall_time_s",
        "peak_memory_bytes",
    )
    details = {"resumed": resume, "log": str(log_path), **{k: result.get(k) for k in keep if k in result}}
    outputs = {"train_dir": str(train_dir), "adapter_dir": str(adapter)}
    arts = [artifact("adapter", adapter)]
    if (train_dir / "metrics.jsonl").is_file():
        arts.append(artifact("metrics", train_dir / "metrics.jsonl"))
    return StageResult(outputs, arts, details)


def stage_fuse(ctx: Ctx) -> StageResult:
    out = ctx.run_dir / "fused"
    ctx.deps.fuse(Path(ctx.outputs["prepull"]["path"]), Path(ctx.outputs["train"]["adapter_dir"]), out)
    config = json.loads((out / "config.json").read_text())
    problems = [f"config.json has {k}" for k in ("quantization", "quantization_config") if k in config]
    dtypes = safetensors_dtypes(out)
    if not dtypes:
        problems.append("no *.safetensors weights")
    if set(dtypes) - {"F32"}:
        problems.append(f"weights are not all float32: {dtypes}")
    if problems:  # never re-quantize (or round) silently: the GGUF export must start from full precision
        raise StageError(
            f"{out}: fused model is not full precision: {'; '.join(problems)}", {"dtypes": dtypes}
        )
    return StageResult({"fused_dir": str(out)}, [artifact("fused_model", out)], {"dtypes": dtypes})


def stage_gguf(ctx: Ctx) -> StageResult:
    outtype = ctx.cfg.export.gguf_type
    fused = Path(ctx.outputs["fuse"]["fused_dir"])
    path = ctx.run_dir / "gguf" / f"model-{outtype}.gguf"
    ctx.deps.export_gguf(fused, path, outtype)
    problems = ctx.deps.check_gguf(path, fused)  # architecture, tensors and shapes, tokenizer, chat template
    details = {"outtype": outtype, "problems": problems}
    if problems:
        raise StageError(f"{path}: {len(problems)} problem(s): {'; '.join(problems[:5])}", details)
    return StageResult({"gguf": str(path), "outtype": outtype}, [artifact("gguf", path)], details)


def chat_for_deploy(cfg: RunConfig, tokenizer: Any) -> tuple[str, list[str], str | None]:
    """(TEMPLATE, stop strings, SYSTEM) so that Ollama renders a question exactly as training rendered it.

    data.template "tokenizer" is matched against ChatML; a default system prompt that the tokenizer's own
    template injects (SmolLM2's does) becomes the Modelfile's SYSTEM.
    """
    from finetune.modelfile import FORMAT_NAMES, ModelfileError, chat_format
    from finetune.templates import get_template

    d = cfg.deploy
    eos = getattr(tokenizer, "eos_token", None) or "</s>"
    if d.template is not None:
        if not d.stop:
            raise ModelfileError(
                "deploy.template is set: give deploy.stop too (the model's end-of-turn strings)"
            )
        return d.template, list(d.stop), d.system
    name = cfg.data.template
    if name in FORMAT_NAMES:
        fmt = chat_format(name, eos=eos)
        return fmt.template, list(d.stop or fmt.stop), d.system
    probe = [{"role": "user", "content": "ping"}]
    got = get_template(name, tokenizer=tokenizer).render_prompt(probe)
    chatml = get_template("chatml").render_prompt(probe)
    fmt = chat_format("chatml")
    if got == chatml:
        return fmt.template, list(d.stop or fmt.stop), d.system
    head, sep = got[: len(got) - len(chatml)], "<|im_start|>system\n"
    if got.endswith(chatml) and head.startswith(sep) and head.endswith("<|im_end|>\n"):
        system = head[len(sep) : -len("<|im_end|>\n")]
        if d.system is not None and d.system != system:
            raise ModelfileError(
                f"deploy.system {d.system!r} differs from the system prompt the data template adds"
            )
        return fmt.template, list(d.stop or fmt.stop), system
    raise ModelfileError(
        f"data.template {name!r} renders {got[:80]!r}, which no Ollama template here reproduces: "
        "set deploy.template and deploy.stop, or use a named data.template"
    )


def stage_ollama(ctx: Ctx) -> StageResult:
    from finetune.modelfile import render_modelfile
    from finetune.models import file_sha256

    location = ctx.deps.locate_ollama()
    if location.binary is None:
        reason = f"no Ollama binary: {location.reason}"
        return StageResult(
            {"deployed": False, "reason": reason}, status="skipped", reason=reason, cache=False
        )
    gguf, name = Path(ctx.outputs["gguf"]["gguf"]), ctx.cfg.deploy.model_name
    tokenizer = ctx.deps.load_tokenizer(Path(ctx.outputs["prepull"]["path"]))
    template, stops, system = chat_for_deploy(ctx.cfg, tokenizer)
    text = render_modelfile(
        gguf, template=template, stop=stops, parameters=ctx.cfg.deploy.parameters, system=system
    )
    try:
        server = ctx.session.start(location.binary)
    except Exception as exc:  # Ollama cannot run here: degrade to llama.cpp, loudly in the report
        reason = f"ollama serve could not start ({location.binary}): {type(exc).__name__}: {exc}"
        return StageResult(
            {"deployed": False, "reason": reason}, status="skipped", reason=reason, cache=False
        )
    folder = ctx.session.folder
    result = ctx.deps.deploy(server, name, gguf, text, folder)
    ctx.session.models.add(name)
    details: dict[str, Any] = {
        "binary": str(location.binary),
        "version": getattr(server, "version", None),
        "model": name,
        "modelfile": str(result.modelfile_path),
        "deploy_checks": [_check(c) for c in result.checks],
    }
    if not result.passed:
        bad = [c.name for c in result.checks if not c.passed]
        raise StageError(f"Ollama deploy checks failed: {', '.join(bad)}", details)
    first = (
        (Path(ctx.outputs["dataset"]["data_dir"]) / "source.jsonl")
        .read_text(encoding="utf-8")
        .splitlines()[0]
    )
    question = json.loads(first)["messages"][-2]["content"]  # a training question: the answer is known
    checks = ctx.deps.served_checks(server.client(), name, question)
    details["served_checks"] = [_check(c) for c in checks]
    if not checks or not all(c.passed for c in checks):
        bad = [c.name for c in checks if not c.passed]
        raise StageError(f"served-model checks failed: {', '.join(bad) or 'none ran'}", details)
    modelfile = Path(result.modelfile_path)
    outputs = {"deployed": True, "binary": str(location.binary), "model": name, "modelfile": str(modelfile),
               "modelfile_sha256": file_sha256(modelfile)}  # fmt: skip
    return StageResult(outputs, [artifact("modelfile", modelfile)], details)


def _check(c: Any) -> dict[str, Any]:
    return {"name": c.name, "passed": bool(c.passed), "detail": str(c.detail)}


def stage_evaluate(ctx: Ctx) -> StageResult:
    from finetune.atomic import atomic_write_json

    ollama_out = ctx.outputs.get("ollama", {})
    llama_reason = ctx.deps.llamacpp_reason()
    notes = {}
    if not ollama_out.get("deployed") and llama_reason is not None:
        why = f"Ollama not deployed ({ollama_out.get('reason', 'skipped')}); llama.cpp unavailable ({llama_reason})"
        if ctx.deps.environ.get(ALLOW_NO_RUNTIME) != "1":
            raise StageError(
                f"no runtime can serve the GGUF: {why}. Set {ALLOW_NO_RUNTIME}=1 to evaluate MLX only"
            )
        notes["no_runtime"] = f"{why}; allowed by {ALLOW_NO_RUNTIME}=1"
    ollama = None
    if ollama_out.get("deployed"):
        binary, name, modelfile = (
            Path(ollama_out["binary"]),
            ollama_out["model"],
            Path(ollama_out["modelfile"]),
        )

        def ollama(prompts: Sequence[EvalPrompt], max_tokens: int) -> list[Any]:
            server = ctx.session.ensure_model(binary, name, modelfile)
            return ctx.deps.ollama_answers(server.client(), name, prompts, max_tokens)

    template, stops, _ = chat_for_deploy(
        ctx.cfg, ctx.deps.load_tokenizer(Path(ctx.outputs["prepull"]["path"]))
    )
    inputs = EvalInputs(
        base_dir=Path(ctx.outputs["prepull"]["path"]),
        adapter_dir=Path(ctx.outputs["train"]["adapter_dir"]),
        fused_dir=Path(ctx.outputs["fuse"]["fused_dir"]),
        gguf=Path(ctx.outputs["gguf"]["gguf"]),
        gguf_type=ctx.outputs["gguf"]["outtype"],
        data_dir=Path(ctx.outputs["dataset"]["data_dir"]),
        template=ctx.cfg.data.template,
        stops=stops,
        settings=ctx.settings,
        llamacpp_reason=llama_reason,
        ollama=ollama,
    )
    outcome = ctx.deps.evaluate(inputs, ctx.log)
    result = outcome.to_dict()
    path = ctx.run_dir / "eval" / "results.json"
    atomic_write_json(path, result)
    details = {**notes, "runtimes": result["runtimes"], "served_runtime": result["served_runtime"]}
    if not outcome.passed:
        bad = [v.name for v in outcome.verdicts if not v.passed]
        raise StageError(
            f"gates failed: {', '.join(bad) or 'no gate ran'}", {**details, "evaluation": result}
        )
    return StageResult({"evaluation": result}, [artifact("eval_results", path)], details)


STAGES: tuple[tuple[str, Callable[[Ctx], StageResult]], ...] = (
    ("prepull", stage_prepull),
    ("dataset", stage_dataset),
    ("train", stage_train),
    ("fuse", stage_fuse),
    ("gguf", stage_gguf),
    ("ollama", stage_ollama),
    ("evaluate", stage_evaluate),
)


def _up(ctx: Ctx, *names: str) -> dict[str, Any]:
    """Upstream stages as inputs: their own inputs digest and the sha256 of each artifact they made."""
    return {n: {"digest": ctx.digests.get(n), "artifacts": ctx.artifacts.get(n, {})} for n in names}


def stage_inputs(name: str, ctx: Ctx) -> dict[str, Any]:
    """What a stage's output depends on: its config sections and the upstream stages it reads."""
    cfg = ctx.cfg
    if name == "prepull":
        return {"model": cfg.model.name}
    if name == "dataset":
        return {**_section(cfg, "data"), **_up(ctx, "prepull")}
    if name == "train":
        return {**_section(cfg, "data", "lora", "training"), **_up(ctx, "prepull", "dataset")}
    if name == "fuse":
        return {"dtype": FUSE_DTYPE, **_up(ctx, "prepull", "train")}
    if name == "gguf":
        return {**_section(cfg, "export"), **_up(ctx, "fuse")}
    if name == "ollama":
        binary = ctx.deps.locate_ollama().binary
        return {
            **_section(cfg, "deploy"),
            "template": cfg.data.template,
            "binary": str(binary),
            **_up(ctx, "gguf"),
        }
    if name == "evaluate":
        return {
            "settings": ctx.settings.to_dict(),
            "template": cfg.data.template,
            "deploy": cfg.deploy.model_dump(mode="json"),
            "ollama_deployed": bool(ctx.outputs.get("ollama", {}).get("deployed")),
            "llamacpp": ctx.deps.llamacpp_reason(),
            **_up(ctx, "prepull", "dataset", "train", "fuse", "gguf", "ollama"),
        }
    raise KeyError(name)
