"""Command line of the Hub workflow: ``mergekit-lite upload OUT org/name`` and ``run ... --upload org/name``.

Kept apart from :mod:`mergekit_lite.cli` so that building the parser stays cheap (nothing here
imports torch or huggingface_hub until a command runs). The options are the same for both forms;
``--endpoint`` also tells ``run`` where to download Hub models from.
"""

from __future__ import annotations

import argparse
import sys
from typing import Any


def add_upload_options(p: argparse.ArgumentParser, *, after_run: bool) -> None:
    """The options of an upload; `after_run` adds ``--upload REPO`` (the ``run`` form)."""
    if after_run:
        p.add_argument("--upload", default=None, metavar="ORG/NAME",
                       help="after the merge, upload OUT to this Hub repo (created if missing)")
    p.add_argument("--private", action="store_true", help="create the repo private (if it does not exist yet)")
    p.add_argument("--revision", default=None, metavar="BRANCH",
                   help="branch to commit to (created from main if missing) [main]")
    p.add_argument("--commit-message", default=None, metavar="M", help="commit message")
    p.add_argument("--endpoint", default=None, metavar="URL",
                   help="the Hub to use [$HF_ENDPOINT, else https://huggingface.co]"
                        + ("; also where Hub models in the plan are downloaded from" if after_run else ""))


def add_upload_parser(sub: Any) -> None:
    p = sub.add_parser("upload", help="upload an output folder to the Hugging Face Hub",
                       description="Upload an output folder to a Hub model repo (created if missing). The token is "
                                   "HF_TOKEN or your saved login (hf auth login); it is never printed.")
    p.add_argument("folder", help="the output folder (from mergekit-lite run)")
    p.add_argument("repo", help="Hub repo id, org/name")
    add_upload_options(p, after_run=False)
    p.add_argument("-q", "--quiet", action="store_true", help="print nothing on success")


def upload_target(args: argparse.Namespace, repo: str) -> Any:
    from .io.hub import Upload

    return Upload(repo, private=args.private, revision=args.revision, commit_message=args.commit_message,
                  endpoint=args.endpoint)


def upload_folder(args: argparse.Namespace, folder: str, repo: str) -> int:
    """Upload `folder` as the options in `args` say; prints where it went."""
    from .io.hub import upload

    url = upload(folder, upload_target(args, repo))
    if not getattr(args, "quiet", False):
        print(f"uploaded {folder} to {repo}: {url}", file=sys.stdout)
    return 0


def upload_command(args: argparse.Namespace) -> int:
    return upload_folder(args, args.folder, args.repo)
