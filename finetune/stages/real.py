"""The real collaborators behind every stage (imports are lazy: the CLI starts fast)."""

from __future__ import annotations

import importlib.util

from finetune.stages.context import Deps


def llamacpp_reason() -> str | None:
    if importlib.util.find_spec("xllamacpp") is None:
        return "PyPI xllamacpp is not installed (`make setup` installs it)"
    return None


def real_deps() -> Deps:
    from finetune.data.prepare import prepare_for_run
    from finetune.evaluate import base_prefetch, run_measurements
    from finetune.evaluate.evaluation import run_evaluation
    from finetune.evaluate.runtimes import ollama_answers, openai_answers, real_backends
    from finetune.export import fuse, fuse_check, gguf, gguf_inspect
    from finetune.models.resolve import resolve_model
    from finetune.models.tokenizer import load_tokenizer
    from finetune.serve import deploy, ollama_provision, ollama_server
    from finetune.serve.rendered import DEBUG_ENV
    from finetune.stages import versions
    from finetune.system import doctor, resources
    from finetune.train import peak_memory
    from finetune.train.engine import train_run
    from finetune.train.memory import from_run_config
    from finetune.train.ranks import data_parallel

    return Deps(
        resolve_model=resolve_model,
        load_tokenizer=load_tokenizer,
        prepare_data=prepare_for_run,
        estimate=lambda cfg, model_config, data: from_run_config(model_config, cfg, data),
        # one rank, training.ranks local ranks, or a rank of mlx.launch's world
        train=data_parallel(train_run),
        measure_learning=run_measurements.measure_learning,
        measure_memory=peak_memory.measure_memory,
        prefetch_memory=peak_memory.prefetch_full,
        prefetch_base_learning=base_prefetch.prefetch,
        masked_rows=run_measurements.masked_rows,
        fuse=fuse.fuse,  # dequantize=True is its default: a quantized base is fused in full precision
        measure_fuse=fuse_check.measure_fuse,
        export_gguf=lambda hf, out, outtype: gguf.convert_hf_to_gguf(hf, out, outtype),
        check_gguf=gguf_inspect.check_gguf,
        locate_ollama=ollama_provision.locate_ollama,
        # the debug log holds every prompt the server renders (served_template reads it)
        ollama_server=lambda binary, folder: ollama_server.OllamaServer(binary, folder, env_extra=DEBUG_ENV),
        deploy=deploy.deploy,
        served_checks=deploy.served_checks,
        ollama_answers=ollama_answers,
        openai_answers=openai_answers,
        llamacpp_reason=llamacpp_reason,
        evaluate=lambda inputs, log: run_evaluation(inputs, real_backends(), log=log),
        collect_env=doctor.collect,
        describe_machine=lambda: doctor.render(doctor.collect()),
        available_memory=resources.available_memory_bytes,
        tool_version=versions.tool_version,
        ollama_version=versions.ollama_version,
    )
