"""Command-line glue of ``eval``, ``search`` and ``demo-train``: argument setup and handlers.

Importing this module imports neither torch nor transformers (``mergekit-lite --help`` stays
fast); the handlers import what they need.
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from ..errors import MergeError


def _scoring_options(p: argparse.ArgumentParser) -> None:
    p.add_argument("--tasks", nargs="+", required=True, metavar="FILE",
                   help="task files: .jsonl with prompt/answer (exact match, per-character accuracy) or text "
                        "(perplexity)")
    p.add_argument("--device", default="auto", help="where merges and models run: auto, cpu, cuda, cuda:N [auto]")
    p.add_argument("--dtype", default="float32", help="dtype the model is scored in: float32, bfloat16, float16 "
                                                      "[float32]")
    p.add_argument("--batch-size", type=int, default=64, help="prompts decoded together [64]")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="score only the first N examples of each file")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress output")


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("eval", help="score models and merges on task files (needs transformers)")
    p.add_argument("models", nargs="*", metavar="MODEL", help="model folders, .safetensors files, Hub ids, or plans "
                                                             "(.yml: scored as merged in memory)")
    p.add_argument("--plan", help="score this plan's output (merged in memory) next to its input models")
    p.add_argument("--output-only", action="store_true", help="with --plan: skip the input models")
    p.add_argument("--json", metavar="FILE", help="also write the scores as JSON")
    p.add_argument("--seed", type=int, default=None, help="seed for random merge methods (overrides the plans')")
    _scoring_options(p)

    p = sub.add_parser("search", help="find the plan parameters that score best on validation tasks")
    p.add_argument("plan", help="YAML merge plan (its search: section gives the space)")
    p.add_argument("--param", action="append", default=[], metavar="KEY=VALUES",
                   help="a parameter to search: lambda=0.5,1,1.5 (values) or density=0.2:0.8:0.1 (MIN:MAX[:STEP]); "
                        "models[1].weight=... for one model; adds to or replaces the plan's search: entries")
    p.add_argument("--strategy", default="grid", choices=("grid", "random"),
                   help="grid: every combination; random: --budget candidates drawn with --seed [grid]")
    p.add_argument("--budget", type=int, default=None, help="candidates the random strategy tries")
    p.add_argument("--seed", type=int, default=0, help="seed of the random strategy [0]")
    p.add_argument("--metric", default="exact", choices=("exact", "char", "ppl"),
                   help="what to maximise: mean exact match, mean per-character accuracy, or (minimise) perplexity")
    p.add_argument("--results", default=None, metavar="FILE",
                   help="resumable results, JSON lines [PLAN-NAME.search.jsonl in the working directory]")
    p.add_argument("--out-plan", default=None, metavar="FILE", help="where the best plan goes [PLAN-NAME.best.yml]")
    p.add_argument("--merge", default=None, metavar="OUT", help="also merge the best plan into this folder")
    p.add_argument("--overwrite", action="store_true", help="with --merge: replace OUT if it exists")
    _scoring_options(p)

    p = sub.add_parser("demo-train", help="train the demo's tiny models on synthetic tasks (needs transformers)")
    p.add_argument("out", help="folder for models/ and tasks/")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1, help="torch threads [1]")
    p.add_argument("--steps-scale", type=float, default=1.0,
                   help="multiply every training run's steps (0.1 for a quick try) [1]")


def handle(args: argparse.Namespace) -> int | None:
    """Run the command if it is one of these (its exit status), else None."""
    handlers = {"eval": _eval, "search": _search, "demo-train": _demo}
    return handlers[args.command](args) if args.command in handlers else None


def _say(args: argparse.Namespace):
    return (lambda msg: None) if args.quiet else (lambda msg: print(msg, file=sys.stderr))


def _eval(args: argparse.Namespace) -> int:
    from .evaluate import evaluate

    report = evaluate(args.models, args.tasks, plan=args.plan, inputs=not args.output_only, device=args.device,
                      dtype=args.dtype, batch_size=args.batch_size, limit=args.limit, seed=args.seed,
                      progress=_say(args))
    print(report.table())
    if args.json:
        with open(args.json, "w", encoding="utf-8") as fh:
            json.dump(report.to_json(), fh, indent=2)
            fh.write("\n")
    return 0


def _search(args: argparse.Namespace) -> int:
    from .search import search

    stem = os.path.splitext(os.path.basename(args.plan))[0]
    results = args.results or f"{stem}.search.jsonl"
    out_plan = args.out_plan or f"{stem}.best.yml"
    result = search(args.plan, args.tasks, params=args.param, strategy=args.strategy, budget=args.budget,
                    seed=args.seed, metric=args.metric, results=results, out_plan=out_plan, merge_to=args.merge,
                    device=args.device, dtype=args.dtype, batch_size=args.batch_size, limit=args.limit,
                    progress=not args.quiet, overwrite=args.overwrite)
    best = result.best
    value = best.metrics.get(args.metric, best.score)
    failed = sum(1 for t in result.trials if t.error)
    print(f"best of {len(result.trials)} candidates ({result.strategy}{f', {failed} failed' if failed else ''}): "
          f"{json.dumps(best.params)}  {args.metric} {value:.4f}")
    print(f"best plan: {out_plan}; results: {results}" + (f"; merged into {args.merge}" if args.merge else ""))
    return 0


def _demo(args: argparse.Namespace) -> int:
    from dataclasses import replace

    from ..demo import BASE_SCHEDULE, FINETUNE_SCHEDULES, train_demo
    from .hf import transformers

    transformers()  # a readable error without the extra
    if args.steps_scale <= 0:
        raise MergeError(f"--steps-scale must be positive, got {args.steps_scale}")
    scaled = lambda s: replace(s, steps=max(1, round(s.steps * args.steps_scale)))  # noqa: E731
    folders = train_demo(args.out, seed=args.seed, base=scaled(BASE_SCHEDULE), threads=args.threads,
                         finetune={task: scaled(s) for task, s in FINETUNE_SCHEDULES.items()})
    print("\n".join(folders.values()))
    return 0
