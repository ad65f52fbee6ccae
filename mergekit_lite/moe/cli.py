"""``mergekit-moe CONFIG OUT``: mergekit-moe's command line over mergekit-lite's streaming engine.

The same config also runs with ``mergekit-lite run``. This entry point takes mergekit's merge flags
from the one table of :mod:`mergekit_lite.flags` (as ``mergekit-yaml`` does, and with the same
handling: mapped, accepted, noted or refused), mergekit-lite's own ``--overwrite``, ``--max-memory``
and ``--max-shard-size`` (:func:`~mergekit_lite.dropin.add_own_options`), and mergekit-moe's three
flags of its own (:data:`MOE_FLAGS`), none of which changes the result here.

Nothing heavy is imported until a config is run, so ``--help`` is instant and needs no torch.
"""

from __future__ import annotations

import argparse
import sys

from ..dropin import add_own_options, guarded, options_for, prepare, run_plan
from ..errors import MergeError
from ..flags import Parser, add_flags, apply_flags

# mergekit-moe's own flags -> what becomes of them here (a note on stderr when given)
MOE_FLAGS = {
    "--load-in-4bit": "noted, not honoured: gate_mode hidden runs the base model in bfloat16, as without the flag",
    "--load-in-8bit": "noted, not honoured: gate_mode hidden runs the base model in bfloat16, as without the flag",
    "--i-understand-this-is-not-useful-without-training": "accepted: experts that are all the same model are a "
                                                          "warning here, not an error",
}


def build_parser() -> Parser:
    p = Parser(prog="mergekit-moe", description="Build a mixture of experts from dense models with mergekit-lite, "
               "streamed: mergekit-moe 0.1.5's config and command line.")
    p.add_argument("config", metavar="CONFIG_PATH", help="mergekit-moe YAML config (base_model, experts, ...)")
    p.add_argument("out", metavar="OUT_PATH", help="output folder (written atomically)")
    group = p.add_argument_group("mergekit-moe's flags")
    for flag, ours in MOE_FLAGS.items():
        group.add_argument(flag, dest="moe_flags", action="append_const", const=flag, help=ours)
    add_flags(p)
    add_own_options(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded("mergekit-moe", lambda: _run(args), entry=argv is None)


def _run(args: argparse.Namespace) -> int:
    from ..plan.schema import load_plan

    settings = apply_flags(args)
    settings.notes += [f"{flag}: {MOE_FLAGS[flag]}" for flag in dict.fromkeys(args.moe_flags or [])
                       if MOE_FLAGS[flag].startswith("noted")]
    prepare(settings)
    recipe = load_plan(args.config)
    if recipe.output.moe is None:
        raise MergeError(f"{args.config}: not a mixture of experts config (it has no 'experts:'); "
                         "run merge plans with mergekit-yaml or mergekit-lite run")
    return run_plan(recipe, args.out, options_for(args, settings))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
