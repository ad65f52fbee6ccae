"""``mergekit-extract-lora``: mergekit's command line for LoRA extraction, run by mergekit-lite.

A script that calls ``mergekit-extract-lora --model F --base-model B --out-path OUT --max-rank R``
runs unchanged (see :mod:`mergekit_lite.extract`; the factors are the same truncation of the full
SVD). mergekit's flags that mergekit-lite does not implement are refused by name, never ignored.
Torch-free until it runs.
"""

from __future__ import annotations

import argparse
import os
import sys

# mergekit flags with no equivalent here: flag -> what to do instead
UNSUPPORTED = {
    "--save-module": "modules that differ are saved whole automatically",
    "--exclude-regex": "every linear weight is extracted",
    "-e": "every linear weight is extracted",
    "--include-regex": "every linear weight is extracted",
    "-i": "every linear weight is extracted",
    "--sv-epsilon": "use mergekit-lite extract-lora --rank-error or --energy",
    "--skip-undecomposable": "tensors that are not linear weights are saved whole only when they differ",
    "--lora-merge-cache": "adapters are never materialised",
    "--trust-remote-code": "no code from model repos is run",
}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="mergekit-extract-lora",
                                description="Extract a PEFT LoRA adapter (mergekit-lite, mergekit's flags).")
    p.add_argument("--model", required=True, help="fine-tuned model path")
    p.add_argument("--base-model", required=True, help="base model path")
    p.add_argument("--out-path", required=True, help="output path for the extracted LoRA adapter")
    p.add_argument("--max-rank", type=int, default=128, help="maximum rank for LoRA decomposition [128]")
    p.add_argument("--embed-lora", action=argparse.BooleanOptionalAction, default=False,
                   help="extract LoRA weights for embeddings (vs. saved whole)")
    p.add_argument("--distribute-scale", action=argparse.BooleanOptionalAction, default=True,
                   help="accepted: the singular values are always split evenly between A and B")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:N or auto")
    p.add_argument("--cuda", action=argparse.BooleanOptionalAction, default=False, help="same as --device cuda")
    p.add_argument("--quiet", action=argparse.BooleanOptionalAction, default=False, help="no report")
    p.add_argument("-v", action="count", default=0, help="accepted for compatibility")
    return p


def main(argv: list[str] | None = None) -> int:
    args, rest = build_parser().parse_known_args(argv)
    refused = [a.split("=")[0] for a in rest if a.split("=")[0] in UNSUPPORTED]
    if refused or rest:
        why = "; ".join(f"{f}: {UNSUPPORTED[f]}" for f in refused)
        other = [a for a in rest if a.split("=")[0] not in UNSUPPORTED and a.startswith("-")]
        print(f"mergekit-extract-lora (mergekit-lite): not supported: {why or ', '.join(other or rest)}",
              file=sys.stderr)
        return 2
    from .errors import MergeError
    from .extract import extract_lora

    device = args.device or ("cuda" if args.cuda else "auto")
    out = args.out_path
    # mergekit writes into OUT whatever is there; here OUT is replaced whole, so only an empty folder
    # or an earlier adapter is replaced
    replace = os.path.isdir(out) and (not os.listdir(out) or os.path.exists(os.path.join(out, "adapter_config.json")))
    try:
        done = extract_lora(args.base_model, args.model, out, rank=args.max_rank, embed_lora=args.embed_lora,
                            device=device, overwrite=replace, quiet=args.quiet)
    except MergeError as exc:
        print(f"mergekit-extract-lora (mergekit-lite): error: {exc}", file=sys.stderr)
        return 2
    if not args.quiet:
        print(done.report())
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
