"""``mergekit-lite extract-lora``: its arguments and handler (torch-free until it runs; see
:mod:`mergekit_lite.extract` for what it does)."""

from __future__ import annotations

import argparse


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("out", help="output folder: a PEFT LoRA adapter (written atomically)")
    p.add_argument("--base", required=True, help="base model (folder or org/name[@revision])")
    p.add_argument("--finetuned", required=True, help="fine-tuned model of the same architecture")
    p.add_argument("--rank", type=int, default=32, help="rank of every module, or the most any module gets [32]")
    p.add_argument("--rank-error", type=float, default=None, metavar="E",
                   help="per module, the smallest rank <= --rank with relative error <= E")
    p.add_argument("--energy", type=float, default=None, metavar="F",
                   help="per module, the smallest rank <= --rank keeping the fraction F of the sum of squared "
                        "singular values")
    p.add_argument("--embed-lora", action="store_true",
                   help="embedding LoRA for embeddings and a LoRA for the head (default: saved whole if changed)")
    p.add_argument("--dtype", default="float32", help="dtype of the factors [float32]")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N [auto]")
    p.add_argument("--max-memory", default=None, metavar="SIZE", help="budget for tensor bytes alive at once")
    p.add_argument("--overwrite", action="store_true", help="replace OUT if it exists")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, no report")


def run_command(args: argparse.Namespace) -> int:
    from .extract import extract_lora

    done = extract_lora(args.base, args.finetuned, args.out, rank=args.rank, rank_error=args.rank_error,
                        energy=args.energy, embed_lora=args.embed_lora, dtype=args.dtype, device=args.device,
                        max_memory=args.max_memory, overwrite=args.overwrite, quiet=args.quiet)
    if not args.quiet:
        print(done.report())
        print(f"wrote {args.out}")
    return 0
