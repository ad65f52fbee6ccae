"""``mergekit-moe CONFIG OUT``: mergekit-moe's command line over mergekit-lite's streaming engine.

Takes mergekit-moe's flags so that scripts keep working: ``--random-seed``, ``--out-shard-size``
(mergekit's K/M/B suffixes, counted in bytes as mergekit's writer does), ``--cuda`` / ``--device``,
``--quiet``. Flags that change nothing here (mergekit's performance knobs, pickle options, remote code,
which is never run) are accepted with a note. Two of our own: ``--max-memory`` and ``--overwrite``
(an existing OUT is never replaced without it). The same config also runs with ``mergekit-lite run``.

Nothing heavy is imported until a config is run, so ``--help`` is instant and needs no torch.
"""

from __future__ import annotations

import argparse
import sys

from ..errors import MergeError

# mergekit flags accepted for drop-in use -> why they change nothing here
NO_EFFECT = {
    "--load-in-4bit": "gate_mode hidden runs the base model in bfloat16",
    "--load-in-8bit": "gate_mode hidden runs the base model in bfloat16",
    "--i-understand-this-is-not-useful-without-training": "identical experts are a warning here, not an error",
    "--allow-crimes": "the experts must have the base's architecture",
    "--unsafe-truncate-embeddings": "embeddings are the base's",
    "--trust-remote-code": "remote code is never run",
    "--lazy-unpickle": "pickle weights are never read",
    "--low-cpu-memory": "tensors are streamed one at a time",
    "--read-to-gpu": "tensors are read on the CPU",
    "--multi-gpu": "one device computes",
    "--async-write": "writing is always asynchronous",
    "--clone-tensors": "every tensor is written from its own buffer",
    "--copy-tokenizer": "the tokenizer is always copied",
    "--write-model-card": "a model card is always written",
    "--safe-serialization": "outputs are always safetensors",
}
VALUED_NO_EFFECT = {"--transformers-cache": "the Hugging Face cache is used (HF_HOME)",
                    "--lora-merge-cache": "LoRA inputs are not taken", "--lora-merge-dtype": "LoRA inputs are not taken",
                    "--num-threads": "torch's default thread count is used",
                    "--write-threads": "one writer thread is used"}
NEGATABLE = ("--allow-crimes", "--unsafe-truncate-embeddings", "--trust-remote-code", "--lazy-unpickle",
             "--low-cpu-memory", "--read-to-gpu", "--multi-gpu", "--async-write", "--clone-tensors",
             "--copy-tokenizer", "--write-model-card", "--safe-serialization")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mergekit-moe", description="Build a mixture of experts from dense models "
                                "(mergekit-moe's config and flags, run by mergekit-lite, streamed).")
    p.add_argument("config", metavar="CONFIG_PATH", help="mergekit-moe YAML config (base_model, experts, ...)")
    p.add_argument("out", metavar="OUT_PATH", help="output folder (written atomically)")
    p.add_argument("--random-seed", type=int, default=None, help="seed of random gates and expert noise")
    p.add_argument("--out-shard-size", default="5B", metavar="SIZE", help="largest output shard: 5B, 500M, 2GB [5B]")
    p.add_argument("--cuda", dest="device", action="store_const", const="cuda", help="compute on the GPU")
    p.add_argument("--no-cuda", dest="device", action="store_const", const="cpu", help="compute on the CPU")
    p.add_argument("--device", dest="device", default="cpu", help="cpu, cuda or cuda:N [cpu]")
    p.add_argument("--gpu-rich", dest="device", action="store_const", const="cuda", help="alias for --cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--no-quiet", dest="quiet", action="store_false")
    p.add_argument("-v", "--verbose", action="count", default=0, help=argparse.SUPPRESS)
    p.add_argument("--max-memory", default=None, metavar="SIZE", help="budget for tensor bytes alive at once [auto]")
    p.add_argument("--overwrite", action="store_true", help="replace OUT_PATH if it exists")
    for flag, why in NO_EFFECT.items():
        p.add_argument(flag, dest="ignored", action="append_const", const=flag, help=f"accepted; no effect ({why})")
        if flag in NEGATABLE:
            p.add_argument("--no-" + flag[2:], dest="ignored", action="append_const", const="--no-" + flag[2:],
                           help=argparse.SUPPRESS)
    for flag, why in VALUED_NO_EFFECT.items():
        p.add_argument(flag, *(["-j"] if flag == "--num-threads" else []), dest="ignored", action="append",
                       type=lambda _v, f=flag: f, metavar="VALUE", help=f"accepted; no effect ({why})")
    return p


def shard_bytes(text: str) -> str | int:
    """mergekit's size (``5B``, ``500M``, ``100K``: thousands, millions, billions), else ours (``2GB``)."""
    units = {"K": 10**3, "M": 10**6, "B": 10**9}
    head, unit = text[:-1], text[-1:].upper()
    if unit in units:
        try:
            return int(float(head) * units[unit])
        except ValueError:
            pass
    return text


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    for flag in dict.fromkeys(args.ignored or []):
        why = NO_EFFECT.get(flag.replace("--no-", "--")) or VALUED_NO_EFFECT[flag]
        print(f"mergekit-moe: note: {flag} has no effect here: {why}", file=sys.stderr)
    try:
        return _run(args)
    except MergeError as exc:
        print(f"mergekit-moe: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("mergekit-moe: interrupted; nothing was written", file=sys.stderr)
        return 130


def _run(args: argparse.Namespace) -> int:
    from ..merge import Options, compile_plan, execute
    from ..plan.schema import load_plan

    recipe = load_plan(args.config)
    if recipe.output.moe is None:
        raise MergeError(f"{args.config}: not a mixture of experts config (it has no 'experts:'); "
                         "run merge plans with mergekit-lite run")
    options = Options(device=args.device, max_memory=args.max_memory, max_shard_size=shard_bytes(args.out_shard_size),
                      overwrite=args.overwrite, quiet=args.quiet, seed=args.random_seed)
    compiled = compile_plan(recipe, options)
    for warning in compiled.warnings:
        print(f"mergekit-moe: warning: {warning}", file=sys.stderr)
    stats = execute(compiled, args.out, options)
    if not args.quiet:
        print(f"wrote {stats.tensors} tensors to {args.out} in {stats.seconds:.1f}s", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
