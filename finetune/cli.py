"""`finetune` command line: config, prepare, estimate, doctor, train, run, validate, pipeline, export.

Exit codes: 0 passed (or trained, for `train`), 1 a stage or gate failed, 2 bad input (config, data,
model folder; FT_INJECT_FAULT without the test harness's arming key), 3 degraded (something required was
skipped; FT_ALLOW_SKIP allows named skips), 4 fault_injected (the test harness planted a fault: never a
pass), 130 / 143 / 129 interrupted by SIGINT / SIGTERM / SIGHUP (resumable with the printed command).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

import yaml

from finetune.config.loader import list_profiles, load_config, load_file
from finetune.config.schema import RunConfig
from finetune.errors import UserError
from finetune.system.console import plain_unless_terminal


def _config_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", "-p", help=f"a profile ({', '.join(list_profiles())})")
    p.add_argument("--config", "-c", help="your YAML, applied over the profile")
    p.add_argument(
        "--set", "-s", action="append", default=[], metavar="KEY=VALUE", help="e.g. training.iters=50"
    )
    p.add_argument(
        "--data",
        "-d",
        metavar="PATH",
        help="your dataset (= --set data.source=PATH): a file, saved dataset or Hub id",
    )


def _run_args(p: argparse.ArgumentParser) -> None:
    _config_args(p)
    p.add_argument(
        "--run-dir", help="default: <output_dir>/<profile>-<time>; an existing run uses its own config"
    )
    p.add_argument("--resume", action="store_true", help="continue the run in --run-dir with its own config")
    p.add_argument("--quiet", "-q", action="store_true", help="no progress lines while a long stage runs")
    p.add_argument(
        "--override",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="change an allowed key of an existing run (training.iters, cadences, gates.*); recorded",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="finetune", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)

    cfg = sub.add_parser("config", help="show or validate configs").add_subparsers(
        dest="action", required=True
    )
    _config_args(cfg.add_parser("show", help="print the resolved config"))
    cfg.add_parser("validate", help="check a config file").add_argument("file")
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

    _run_args(sub.add_parser("train", help="prepare and train only (not judged)"))
    _run_args(sub.add_parser("run", help="prepare, train and judge with the training gates"))
    _run_args(
        sub.add_parser("pipeline", help="tier 3: LoRA -> fuse -> GGUF -> Ollama -> evaluation -> report")
    )

    v = sub.add_parser("validate", help="judge a finished run again from what it saved (fresh process)")
    v.add_argument("run_dir")

    e = sub.add_parser("export", help="a finished run in the form a runtime loads, judged there")
    e.add_argument("run_dir", nargs="+", help="a finished run; several with --as gguf-lora share one base")
    e.add_argument(
        "--as",
        dest="form",
        required=True,
        type=_export_form,
        help="peft: transformers + peft; gguf-lora: llama.cpp / Ollama ADAPTER, with the base GGUF; "
        "gguf:TYPE (q8_0, q6_K, q5_K_M, q4_K_M, ...): the fused model quantized, judged against its f16",
    )
    e.add_argument("--out", help="default: RUN/export/<form>; elsewhere a new or empty folder")

    h = sub.add_parser(
        "history", help="trends of every run so far; --check compares the latest with its baseline"
    )
    h.add_argument("--command", dest="only", help="only this command's runs (run, pipeline, validate, train)")
    h.add_argument("--last", type=int, default=10, help="runs per command to show (default 10)")
    h.add_argument(
        "--check", action="store_true", help="exit 1 when the latest run regressed beyond its bands"
    )
    h.add_argument("--file", help="the history file (default: $FT_HISTORY or <output_dir>/history.jsonl)")
    return parser


def main(argv: Sequence[str] | None = None, *, deps=None, out=None) -> int:
    """Entry point. `deps` (a finetune.stages.context.Deps) replaces the real model and trainer in tests."""
    args = build_parser().parse_args(argv)
    out = out or sys.stdout
    try:
        with plain_unless_terminal():
            if args.command not in ("train", "run", "validate", "pipeline"):
                return _dispatch(args, deps, out)
            from finetune.recipes.commands import RECIPES
            from finetune.recipes.execution import print_result
            from finetune.train import distributed

            # Under mlx.launch or mpirun every rank runs this command: rank 0 runs it, the others train the
            # shard of what rank 0 sends them and write nothing (docs/distributed.md).
            world = distributed.join() if distributed.launched() else distributed.SINGLE
            if world.sharded and not world.writer:
                return _follow(world)
            with distributed.leading(world):
                cfg, run_dir = _run_config(args)
                heartbeat_s = 0 if getattr(args, "quiet", False) else 15.0
                result = RECIPES[args.command](
                    cfg, run_dir, _deps(deps), log=_printer(out), heartbeat_s=heartbeat_s
                )
            print_result(result, out)
            return result.exit_code
    except UserError as exc:
        from finetune.config.loader import ConfigError

        print(f"{'config' if isinstance(exc, ConfigError) else 'input'} error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


def _follow(world) -> int:
    from finetune.train.engine import train_run
    from finetune.train.follower import follow

    return follow(world, train_run)


def _export_form(text: str) -> str:
    from finetune.recipes.export_adapter import parse_form

    try:
        return parse_form(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _export(args, deps, out) -> int:
    from finetune.recipes.export_adapter import export_run

    target = Path(args.out) if args.out else None
    d = _deps(deps)
    from finetune.serve.ollama_provision import locate_ollama

    locate = getattr(d, "locate_ollama", None) or locate_ollama  # found once, for every export form
    if len(args.run_dir) > 1:
        if args.form != "gguf-lora":
            raise UserError(
                f"--as {args.form} exports one run; several runs share one base with --as gguf-lora"
            )
        from finetune.recipes.export_shared import export_shared

        return export_shared([Path(r) for r in args.run_dir], target, d.resolve_model, _printer(out), locate)
    server = getattr(d, "ollama_server", None)
    return export_run(
        Path(args.run_dir[0]), args.form, target, d.resolve_model, _printer(out), locate, server
    )


def _deps(deps):
    if deps is not None:
        return deps
    from finetune.recipes.export_adapter import ship_in_run
    from finetune.stages.real import real_deps

    d = real_deps()
    d.ship_form = ship_in_run  # the pipeline ships its forms with `finetune export`'s own code
    return d


def _dispatch(args, deps, out) -> int:
    if args.command == "config":
        if args.action == "show":
            cfg = load_config(args.profile, args.config, _sets(args))
            print(yaml.safe_dump(cfg.to_dict(), sort_keys=False), file=out, end="")
        elif args.action == "validate":
            cfg = load_file(args.file)
            print(f"{args.file}: valid (profile {cfg.profile or 'none'}, model {cfg.model.name})", file=out)
        else:
            print("\n".join(list_profiles()), file=out)
        return 0
    if args.command == "doctor":
        from finetune.system import doctor

        print(doctor.render(doctor.collect()), file=out)
        return 0
    if args.command == "prepare":
        from finetune.config.loader import ConfigError
        from finetune.data import drops
        from finetune.system.owned import claim

        cfg = load_config(args.profile, args.config, _sets(args))
        if args.no_tokenizer and cfg.data.template in ("tokenizer", "auto"):
            raise ConfigError(
                f"--no-tokenizer: data.template is {cfg.data.template!r}, the model's own chat template, which "
                "needs its tokenizer; name one (--set data.template=chatml, gemma, llama3, alpaca, plain) or "
                "drop --no-tokenizer"
            )
        d = _deps(deps)
        tok = None if args.no_tokenizer else d.load_tokenizer(Path(d.resolve_model(cfg.model.name).path))
        out_dir = claim(Path(args.out), flag="--out")  # never over a user's own train.jsonl
        report = d.prepare_data(cfg.data, out_dir, tok).to_dict()
        print(json.dumps(report, indent=2), file=out)
        print("\n".join(f"[data] {line}" for line in drops.summary(report)), file=sys.stderr)
        return 0
    if args.command == "estimate":
        cfg = load_config(args.profile, args.config, _sets(args))
        if args.model_config:
            model_cfg = json.loads(Path(args.model_config).read_text())
        else:
            model_cfg = _deps(deps).resolve_model(cfg.model.name).config
        from finetune.train.memory import format_estimate, from_run_config

        est = from_run_config(model_cfg, cfg)
        print(json.dumps(est.to_dict(), indent=2) if args.json else format_estimate(est), file=out)
        return 0
    if args.command == "history":
        return _history(args, out)
    if args.command == "export":
        return _export(args, deps, out)
    raise AssertionError(args.command)


def _sets(args) -> list[str]:
    """--set assignments, with --data as data.source (quoted, so a path is always a string)."""
    return [*args.set, *([f"data.source={json.dumps(args.data)}"] if getattr(args, "data", None) else [])]


def _run_config(args) -> tuple[RunConfig, Path]:
    """The run directory and the config it owns: a new run's is written there, an existing run keeps its own."""
    from finetune import faults
    from finetune.config.loader import ConfigError
    from finetune.stages.rundir import new_run_dir, own_config

    faults.injected()  # FT_INJECT_FAULT without the harness's arming key: refused before any work (exit 2)
    if args.command == "validate":
        run_dir = Path(args.run_dir)
        return own_config(run_dir, None, command="validate"), run_dir
    if args.resume and not args.run_dir:
        raise ConfigError("--resume needs --run-dir RUN (the run to continue)")
    given = bool(args.profile or args.config or _sets(args))
    exists = bool(args.run_dir) and (Path(args.run_dir) / "config.yaml").is_file()
    if args.resume and not exists:  # never start a fresh run from the defaults and call it resumed
        raise ConfigError(
            f"--resume: {args.run_dir} holds no run to continue (no config.yaml); start one without --resume: "
            f"finetune {args.command} --run-dir {args.run_dir} --profile PROFILE"
        )
    requested = load_config(args.profile, args.config, _sets(args)) if given or not exists else None
    if requested is not None and requested.profile is None:
        requested = requested.model_copy(update={"profile": "custom"})
    run_dir = Path(args.run_dir) if args.run_dir else new_run_dir(requested)
    return own_config(run_dir, requested, args.override, command=args.command), run_dir


def _history(args, out) -> int:
    from finetune.report import history, regressions, trends

    path = Path(args.file) if args.file else history.history_path(load_config().output_dir)
    rows = history.load(path)
    if not rows:
        print(f"no runs recorded in {path} yet", file=out)
        return 0
    if args.check:
        findings = regressions.check(rows, command=args.only)
        print(regressions.render_check(findings), file=out)
        return 1 if regressions.regressions(findings) else 0
    print(trends.render_trends(trends.trends(rows, args.only, args.last)), file=out)
    return 0


def _printer(out):
    def log(message: str) -> None:
        print(message, file=out, flush=True)

    return log


if __name__ == "__main__":
    raise SystemExit(main())
