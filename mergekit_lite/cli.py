"""Command line: ``mergekit-lite run|plan|methods|examples|extract-lora|bench|upload|eval|search|demo-train``.

Bad input (a wrong plan, a missing model or tensor, an existing output) prints a readable error
and exits with status 2; nothing is left in the output folder; SIGINT/SIGTERM exit with 130/143
after removing temporaries (:mod:`.cli_safety`). ``run`` also takes mergekit's flags
(:mod:`.flags`; its handler is :func:`.dropin.run_command`, shared with ``mergekit-yaml``). Building
the parser imports nothing heavy, so ``--help`` and ``methods`` answer at once.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from . import __version__, cli_safety
from .dropin import refused_command
from .flags import Parser, add_flags


def _merge_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="auto (cuda when available), cpu, cuda or cuda:N [auto]")
    p.add_argument("--max-memory", default=None, metavar="SIZE",
                   help="budget for tensor bytes alive at once, e.g. 8GB [auto: the largest step plus read-ahead]")
    p.add_argument("--seed", type=int, default=None, help="seed for random methods (overrides the plan's seed)")
    p.add_argument("--block-size", default=None, metavar="SIZE",
                   help="tensors larger than this (in float32) are merged in row blocks of this size [64MiB]")
    p.add_argument("--max-device-memory", default=None, metavar="SIZE",
                   help="with --device cuda: budget for device memory [90%% of what is free]")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="mergekit-lite", description="Streaming merges of language models "
                                     "from mergekit-style YAML plans.")
    parser.add_argument("--version", action="version", version=f"mergekit-lite {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("run", help="run a merge plan into an output folder")
    p.add_argument("plan", help="YAML merge plan")
    p.add_argument("out", help="output folder (written atomically)")
    _merge_options(p)
    p.add_argument("--max-shard-size", default="5GB", metavar="SIZE",
                   help="largest output shard in bytes, Hugging Face's units: 5GB, 2GiB (mergekit's 1B, a count of "
                        "parameters, is --out-shard-size 1B) [5GB]")
    p.add_argument("--dtype", default=None, help="override the written dtype (float32, float16, bfloat16)")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists and mergekit-lite wrote it")
    cli_safety.add_run_options(p)
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    add_flags(p)
    from .hub_cli import add_upload_options, add_upload_parser

    add_upload_options(p, after_run=True)

    p = sub.add_parser("plan", help="show what a plan will do, without reading any tensor")
    p.add_argument("plan", help="YAML merge plan")
    _merge_options(p)
    p.add_argument("--json", action="store_true", help="machine-readable output")

    p = sub.add_parser("methods", help="list the merge methods and their parameters")
    p.add_argument("name", nargs="?", help="show one method in detail")

    p = sub.add_parser("examples", help="(re)generate the example models used by merge_configs/")
    p.add_argument("dir", nargs="?", default=None, help="target folder [merge_configs/models]")
    p.add_argument("--adapters", default=None, metavar="DIR", help="folder of the example adapters [DIR/../adapters]")
    p.add_argument("--check", action="store_true", help="verify the folder holds exactly what would be generated")

    p = sub.add_parser("extract-lora", help="extract a PEFT LoRA adapter from a fine-tune and its base")
    from .cli_extract import add_arguments as extract_arguments

    extract_arguments(p)
    add_upload_parser(sub)

    p = sub.add_parser("bench", help="measure throughput and peak memory (and mergekit's, when installed)")
    from .bench import add_arguments

    add_arguments(p)
    from .quality.cli import add_commands  # eval, search, demo-train

    add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    """The command line (``argv`` None: the process's own arguments, and this is its entry point).
    Every failure is a message and an exit status (2; 130/143 for SIGINT/SIGTERM), see cli_safety."""
    refusal = refused_command(sys.argv[1:] if argv is None else argv)
    if refusal:
        print(f"mergekit-lite: error: {refusal}", file=sys.stderr)
        return 2
    return cli_safety.run(lambda: _dispatch(build_parser().parse_args(argv)), entry=argv is None)


def _dispatch(args: argparse.Namespace) -> int:
    from .quality.cli import handle

    status = handle(args)
    if status is not None:
        return status
    if args.command == "run":
        from .dropin import run_command

        code = run_command(args)
        if code == 0 and args.upload:
            from .hub_cli import upload_folder

            return upload_folder(args, args.out, args.upload)
        return code
    if args.command == "upload":
        from .hub_cli import upload_command

        return upload_command(args)
    if args.command == "plan":
        from .report import plan_report

        print(plan_report(args.plan, device=args.device or "auto", max_memory=args.max_memory, seed=args.seed,
                          block_size=args.block_size, as_json=args.json))
        return 0
    if args.command == "methods":
        from .report import methods_report

        print(methods_report(args.name))
        return 0
    if args.command == "examples":
        from .example_adapters import write_adapters
        from .examples import check_examples, write_examples

        target = args.dir or os.path.join("merge_configs", "models")
        adapters = args.adapters or os.path.join(os.path.dirname(os.path.normpath(target)), "adapters")
        if args.check:
            problems = check_examples(target) + check_examples(adapters, write_adapters)
            if problems:
                print("\n".join(problems), file=sys.stderr)
                return 1
            print(f"{target}, {adapters}: up to date")
            return 0
        for path in write_examples(target) + write_adapters(adapters):
            print(path)
        return 0
    if args.command == "extract-lora":
        from .cli_extract import run_command

        return run_command(args)
    if args.command == "bench":
        from .bench import run_bench

        report = run_bench(args)
        print(json.dumps(report, indent=2) if args.json else report["text"])
        return 0
    raise AssertionError(args.command)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
