"""mergekit's commands: the ``mergekit-yaml`` and ``mergekit-multi`` entry points, and the handler of
``mergekit-lite run`` that all three share.

``mergekit-yaml CONFIG OUT [flags]`` is ``mergekit-lite run`` under mergekit's name and flags
(:mod:`mergekit_lite.flags`). ``mergekit-multi CONFIG --out-path OUT -I DIR`` runs a multi-document
recipe as mergekit does, every named document written to ``DIR/<name>``, the unnamed one to
``--out-path``, but as one graph (:func:`multi_recipe` gives the named documents ``save: DIR/<name>``):
no stage is read back from disk, and the bits are the same as stage by stage. With ``--lazy``
(mergekit's default) a stage whose folder already holds a model is not merged again: its name
stands for that folder.

mergekit's other tools are recognised and refused by name (:data:`REFUSED_COMMANDS`); their
configuration files are refused by the plan parser (``OTHER_TOOLS`` in :mod:`.plan.parser`).
"""

from __future__ import annotations

import argparse
import copy
import os
import sys
from typing import Any, Callable

from . import cli_safety
from .errors import MergeError, PlanError
from .flags import Parser, Settings, add_flags, apply_flags, report

REFUSED_COMMANDS = {
    "evolve": "mergekit-evolve (evolutionary search over merge parameters, scored with lm-eval) is not supported "
              "by mergekit-lite; write the plan to evaluate and run it with `mergekit-lite run`, or drive a search "
              "from Python (mergekit_lite.Model expressions read nothing until saved or iterated)",
    "tokensurgeon": "mergekit-tokensurgeon (transplanting another model's tokenizer and embeddings) is not "
                    "supported by mergekit-lite; models whose vocabularies differ are merged token by token with "
                    "tokenizer_source: union (or base, or a model) in the plan",
}
REFUSED_COMMANDS.update({f"mergekit-{k}": v for k, v in list(REFUSED_COMMANDS.items())})

# Options fields that mergekit-lite's own flags set; they win over the mergekit flag of the same
# meaning (``run --seed 1 --random-seed 2`` seeds with 1).
OWN_FIELDS = ("device", "max_memory", "max_shard_size", "dtype", "overwrite", "quiet", "seed", "endpoint", "block_size",
              "max_device_memory", "force_overwrite", "resume", "clamp_overflow")
MODEL_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin", "pytorch_model.bin.index.json")


def mergekit_command(name: str = "mergekit-yaml") -> str | None:
    """mergekit's own command `name` on PATH, or None: our entry points of the same name (installed
    with this package) are skipped, so that tools comparing against mergekit never compare with us."""
    for folder in os.get_exec_path():
        path = os.path.join(folder, name)
        if os.path.isfile(path) and os.access(path, os.X_OK) and not _ours(path):
            return path
    return None


def _ours(path: str) -> bool:
    with open(path, "rb") as fh:
        return b"mergekit_lite" in fh.read(4096)


def refused_command(argv: list[str]) -> str | None:
    """The refusal for a command of mergekit's that mergekit-lite does not have, or None."""
    return REFUSED_COMMANDS.get(argv[0]) if argv else None


def add_own_options(p: argparse.ArgumentParser) -> None:
    """mergekit-lite's options that mergekit's command lines lack, for mergekit-yaml and -multi."""
    group = p.add_argument_group("mergekit-lite's options")
    group.add_argument("--overwrite", action="store_true", default=None, help="replace an existing output folder "
                       "(without it, an existing output is an error, never overwritten)")
    group.add_argument("--max-memory", default=None, metavar="SIZE",
                       help="budget for tensor bytes alive at once, e.g. 8GB [auto]")
    group.add_argument("--max-shard-size", default=None, metavar="SIZE",
                       help="largest output shard in bytes, Hugging Face's units (5GB, 2GiB) [5GB]")
    cli_safety.add_run_options(group)


def options_for(args: argparse.Namespace, settings: Settings):
    """The run's Options: mergekit-lite's own flags, then mergekit's, then the defaults."""
    from .merge import Options

    own = {k: getattr(args, k) for k in OWN_FIELDS if getattr(args, k, None) is not None}
    return Options(**{"quiet": False, **settings.options, **own})


def prepare(settings: Settings) -> None:
    """Refused flags stop the run; then the process-wide settings (threads, Hub cache), the notes."""
    if settings.refused:
        raise MergeError("\n".join(settings.refused))
    if settings.cache:
        os.environ["HF_HUB_CACHE"] = os.path.abspath(settings.cache)
    if settings.threads is not None:
        if settings.threads < 1:
            raise MergeError(f"--num-threads must be at least 1, got {settings.threads}")
        import torch

        torch.set_num_threads(settings.threads)
        try:
            torch.set_num_interop_threads(settings.threads)
        except RuntimeError:  # already set, or parallel work started: the intra-op count is what matters
            pass
    report(settings)


def run_plan(plan: Any, out: str, options: Any) -> int:
    """Compile and execute `plan` (a path or a Recipe) into `out`, printing warnings and a summary."""
    from .merge import compile_plan, execute

    compiled = compile_plan(plan, options)
    for w in compiled.warnings:
        print(f"mergekit-lite: warning: {w}", file=sys.stderr)
    stats = execute(compiled, out, options)
    if not options.quiet:
        from .adapter_output import print_reports
        from .io.sizes import human_size

        print_reports(compiled)  # adapter outputs: each module's rank and error
        print(f"wrote {stats.tensors} tensors ({human_size(stats.bytes_written)}) to {out} in "
              f"{stats.seconds:.1f}s on {stats.device}: {human_size(stats.throughput)}/s, "
              f"peak tensor memory {human_size(stats.peak_live_bytes)} (budget {human_size(stats.budget)})")
    return 0


def run_command(args: argparse.Namespace) -> int:
    """``mergekit-lite run PLAN OUT`` and ``mergekit-yaml CONFIG OUT``."""
    settings = apply_flags(args)
    prepare(settings)
    return run_plan(args.plan, args.out, options_for(args, settings))


def guarded(prog: str, fn: Callable[[], int], entry: bool = False) -> int:
    """Run a command as ``mergekit-lite`` runs its own (:mod:`.cli_safety`): a MergeError is printed
    for people and exits 2; SIGINT/SIGTERM exit 130/143 after removing temporaries."""
    return cli_safety.run(fn, entry=entry, prog=prog)


# -- mergekit-yaml ------------------------------------------------------------------------------

def yaml_parser() -> Parser:
    p = Parser(prog="mergekit-yaml", description="Run a mergekit merge config with mergekit-lite: mergekit "
               "0.1.5's command line (`mergekit-lite run` with mergekit's flags).")
    p.add_argument("plan", metavar="CONFIG_FILE", help="mergekit YAML merge config")
    p.add_argument("out", metavar="OUT_PATH", help="output folder (written atomically)")
    add_flags(p)
    add_own_options(p)
    return p


def main_yaml(argv: list[str] | None = None) -> int:
    args = yaml_parser().parse_args(argv)
    return guarded("mergekit-yaml", lambda: run_command(args), entry=argv is None)


# -- mergekit-multi -----------------------------------------------------------------------------

def multi_parser() -> Parser:
    p = Parser(prog="mergekit-multi", description="Run a mergekit-multi recipe (YAML documents separated by ---, "
               "each named except the final one) with mergekit-lite, as one graph. Every named merge is also "
               "written to INTERMEDIATE_DIR/<name>, the unnamed one to --out-path.")
    p.add_argument("plan", metavar="CONFIG_FILE", help="multi-document YAML recipe")
    p.add_argument("--out-path", default=None, metavar="PATH", help="folder of the final (unnamed) merge")
    p.add_argument("-I", "--intermediate-dir", required=True, metavar="PATH",
                   help="folder holding each named merge, as <name>/ (required)")
    p.add_argument("--lazy", action=argparse.BooleanOptionalAction, default=True,
                   help="reuse a named merge whose folder already holds a model (config.json and weights) [on]")
    add_flags(p)
    add_own_options(p)
    return p


def main_multi(argv: list[str] | None = None) -> int:
    args = multi_parser().parse_args(argv)

    def go() -> int:
        settings = apply_flags(args)
        prepare(settings)
        recipe, out = multi_recipe(args.plan, args.intermediate_dir, args.out_path, args.lazy)
        if recipe is None:
            print(f"mergekit-multi: every merge already exists in {args.intermediate_dir} (--lazy); nothing to do",
                  file=sys.stderr)
            return 0
        return run_plan(recipe, out, options_for(args, settings))

    return guarded("mergekit-multi", go, entry=argv is None)


def has_model(folder: str) -> bool:
    """mergekit-multi's test for a merge already done: config.json and a weights file or index."""
    return os.path.isfile(os.path.join(folder, "config.json")) and any(
        os.path.exists(os.path.join(folder, f)) for f in MODEL_FILES)


def multi_recipe(config_file: str, intermediate_dir: str, out_path: str | None, lazy: bool):
    """The recipe of a mergekit-multi file and the folder of its output: each named document gets
    ``save: DIR/<name>``; with `lazy`, a named merge already on disk becomes a passthrough of that
    folder. Without an unnamed document, the last named merge no other uses is the output,
    written to ``DIR/<name>``. Returns (None, None) when there is nothing left to merge."""
    from .plan.schema import parse_documents
    from .plan.source import load_documents

    text = _read(config_file)
    docs = load_documents(text, config_file)
    inter = os.path.abspath(intermediate_dir)
    named = {d.data["name"]: d for d in docs if isinstance(d.data, dict) and isinstance(d.data.get("name"), str)}
    unnamed = [d for d in docs if not any(d is n for n in named.values())]
    if unnamed and not out_path:
        raise MergeError("--out-path is required: the recipe has an unnamed (final) merge")
    reused = {name for name in named if lazy and has_model(os.path.join(inter, name))}
    output = None
    if not unnamed:
        fresh = [name for name in _sinks(docs) if name not in reused]
        if not fresh:
            return None, None
        output = fresh[-1]
    for name, doc in named.items():
        folder = os.path.join(inter, name)
        if name in reused:
            doc.data = {"name": name, "merge_method": "passthrough", "models": [{"model": folder}]}
        elif name != output:
            doc.data.setdefault("save", folder)
    return parse_documents(docs, config_file, text), out_path if unnamed else os.path.join(inter, output)


def _sinks(docs: list) -> list[str]:
    """Names of the documents no other document uses as a model, in document order."""
    from .plan.schema import parser_for

    issues: list = []
    plans = [parser_for(d.data)(d, copy.deepcopy(d.data), (), issues, []).parse() for d in docs]
    if issues:
        raise PlanError(issues)
    used = {r.path for p in plans for r in p.referenced_models()}
    return [p.name for p in plans if p.name not in used]


def _read(path: str) -> str:
    try:
        with open(path, encoding="utf-8") as fh:
            return fh.read()
    except OSError as exc:
        raise MergeError(f"{path}: cannot read the recipe: {exc.strerror or exc}") from None
