"""`finetune` command line: config, prepare, estimate, doctor, train, run, validate, pipeline."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from finetune.config import ConfigError, RunConfig, list_profiles, load_config, load_file


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", "-p", help=f"a profile from configs/ ({', '.join(list_profiles())})")
    p.add_argument("--config", "-c", help="your YAML, applied over the profile")
    p.add_argument(
        "--set", "-s", action="append", default=[], metavar="KEY=VALUE", help="e.g. training.iters=50"
    )


def _resolve(args) -> RunConfig:
    return load_config(args.profile, args.config, args.set)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    cfg = sub.add_parser("config", help="show or validate configs").add_subparsers(
        dest="action", required=True
    )
    show = cfg.add_parser("show", help="print the resolved config")
    _config_args(show)
    val = cfg.add_parser("validate", help="check a config file")
    val.add_argument("file")
    cfg.add_parser("profiles", help="list the profiles")

    prep = sub.add_parser("prepare", help="write train/valid/test.jsonl and a validation report")
    _config_args(prep)
    prep.add_argument("--out", required=True, help="output folder")
    prep.add_argument("--no-tokenizer", action="store_true", help="skip token statistics (no model needed)")

    est = sub.add_parser("estimate", help="predict training memory")
    _config_args(est)
    est.add_argument("--model-config", help="a config.json (default: the profile's model)")
    est.add_argument("--json", action="store_true")

    sub.add_parser("doctor", help="MLX backend, BLAS, threads, versions, memory")

    for name, text in (("train", "train only"), ("run", "prepare, train and gate a run")):
        p = sub.add_parser(name, help=text)
        _config_args(p)
        p.add_argument("--run-dir", help="default: <output_dir>/<profile>-<time>")
        p.add_argument("--resume", action="store_true", help="continue from the run dir's latest checkpoint")

    v = sub.add_parser("validate", help="judge a finished run with the gates that need no model")
    v.add_argument("run_dir")

    pipe = sub.add_parser("pipeline", help="tier 3: LoRA -> fuse -> GGUF -> Ollama -> eval -> report")
    _config_args(pipe)
    pipe.add_argument("--run-dir")
    return parser


def main(argv: Sequence[str] | None = None, *, stages=None, out=None) -> int:
    """Entry point. `stages` (a workflow.Stages) replaces the real model and trainer in tests."""
    out = out or sys.stdout
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args, stages, out)
    except ConfigError as exc:
        print(f"config error: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from finetune.data import DatasetError
        from finetune.templates import TemplateError

        if isinstance(exc, DatasetError | TemplateError):
            print(f"data error: {exc}", file=sys.stderr)
            return 2
        raise
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _dispatch(args, stages, out) -> int:
    if args.command == "config":
        if args.action == "show":
            print(yaml.safe_dump(_resolve(args).to_dict(), sort_keys=False), file=out, end="")
        elif args.action == "validate":
            cfg = load_file(args.file)
            print(f"{args.file}: valid (profile {cfg.profile or 'none'}, model {cfg.model.name})", file=out)
        else:
            print("\n".join(list_profiles()), file=out)
        return 0
    if args.command == "doctor":
        from finetune import doctor

        print(doctor.render(doctor.collect()), file=out)
        return 0
    if args.command == "prepare":
        from finetune.runner import prepare_data, real_stages

        cfg = _resolve(args)
        st = stages or real_stages()
        tok = None if args.no_tokenizer else st.load_tokenizer(Path(st.resolve_model(cfg.model.name).path))
        report = prepare_data(cfg, Path(args.out), tok)
        print(json.dumps(report.to_dict(), indent=2), file=out)
        return 0
    if args.command == "estimate":
        from finetune.runner import estimate_for, real_stages

        cfg = _resolve(args)
        if args.model_config:
            model_cfg = json.loads(Path(args.model_config).read_text())
        else:
            model_cfg = (stages or real_stages()).resolve_model(cfg.model.name).config
        est = estimate_for(cfg, model_cfg)
        if args.json:
            print(json.dumps(est.to_dict(), indent=2), file=out)
        else:
            from finetune.memory import format_estimate

            print(format_estimate(est), file=out)
        return 0
    if args.command in ("train", "run"):
        return _train_or_run(args, stages, out)
    if args.command == "validate":
        from finetune.runner import workflow_gates

        verdicts = workflow_gates(None, Path(args.run_dir), None)
        for v in verdicts:
            print(v, file=out)
        return 0 if all(v.passed for v in verdicts) else 1
    if args.command == "pipeline":
        from finetune.pipeline import pipeline_main

        return pipeline_main(args.profile, args.config, args.set, args.run_dir, out)
    raise AssertionError(args.command)


def _train_or_run(args, stages, out) -> int:
    from finetune.runner import real_stages
    from finetune.workflow import new_run_dir, run_workflow

    cfg = _resolve(args)
    if args.profile is None and cfg.profile is None:
        cfg = cfg.model_copy(update={"profile": "custom"})
    run_dir = Path(args.run_dir) if args.run_dir else new_run_dir(cfg)
    st = stages or real_stages()
    if args.command == "train":
        st.gates = lambda *_: []
    result = run_workflow(cfg, run_dir, st, resume=args.resume)
    summary = json.loads(result.summary_path.read_text())
    for entry in summary["stages"]:
        for v in entry.get("verdicts", []):
            print(f"  [{'PASS' if v['passed'] else 'FAIL'}] {v['name']}: {v['detail']}", file=out)
    train = next((s for s in summary["stages"] if s["stage"] == "train"), {})
    if train.get("result", {}).get("interrupted"):
        print(f"interrupted; resume with: finetune {args.command} --run-dir {run_dir} --resume", file=out)
        return 130
    print(f"run directory: {run_dir}", file=out)
    print(f"report: {result.summary_path}", file=out)
    if args.command == "run" and not result.passed:
        print("gates FAILED", file=out)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
