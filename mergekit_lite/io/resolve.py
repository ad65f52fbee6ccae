"""Turning a plan's model reference into a local path: a folder, a file, or a Hub download.

Local paths are looked up relative to the working directory first, then to the plan file's
folder (so ``merge_configs/*.yml`` run from anywhere). Anything else shaped like ``org/name`` is
fetched with ``huggingface_hub.snapshot_download``, weights, index, config and tokenizer files only;
``HF_HUB_OFFLINE=1`` makes that a cache lookup.
"""

from __future__ import annotations

import os
import re

from ..errors import ModelNotFound

# What a merge needs from a Hub repo; one constant set, so offline cache lookups match downloads.
HUB_PATTERNS = [
    "*.safetensors",
    "*.safetensors.index.json",
    "config.json",
    "generation_config.json",
    "tokenizer*",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.*",
    "merges.txt",
    "*.model",
    "chat_template.*",
]
# Hugging Face's rules: org/name, each part 1-96 characters of letters, digits, '_', '-' and '.',
# starting and ending with a letter, digit or '_', without '--' or '..'.
_PART = r"\w(?:[\w.-]{0,94}\w)?"
_REPO_ID = re.compile(rf"^{_PART}/{_PART}$", re.ASCII)
# A branch, tag, commit or refs/pr/N: no '..', no leading '/', '-' or '.', no trailing '/'.
_REVISION = re.compile(r"^(?!.*\.\.)(?!.*//)[\w][\w./-]{0,199}(?<!/)$", re.ASCII)


def hf_cache_dirs() -> list[str]:
    """The Hugging Face folders (HF_HOME, and the hub cache when set apart), as huggingface_hub
    finds them from the environment: inputs may live there, outputs never go there."""
    home = os.environ.get("HF_HOME") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "huggingface")
    hub = os.environ.get("HF_HUB_CACHE") or os.environ.get("HUGGINGFACE_HUB_CACHE") or os.path.join(home, "hub")
    return [os.path.abspath(os.path.expanduser(d)) for d in dict.fromkeys((home, hub))]


def looks_like_repo_id(path: str) -> bool:
    return bool(_REPO_ID.match(path)) and "--" not in path and ".." not in path


def check_revision(ref: str, revision: str | None) -> None:
    """Refuse a revision that is not a plain branch, tag or commit name, before any download."""
    if revision is not None and not (_REVISION.match(revision) and not revision.endswith(".lock")):
        raise ModelNotFound(f"{ref}: '{revision}' is not a valid revision (a branch, tag or commit: letters, "
                            "digits, '_', '-', '.', '/', without '..')")


def resolve_model(path: str, revision: str | None = None, plan_dir: str | None = None) -> str:
    """Local path of a model reference (downloading it from the Hub if it is a repo id)."""
    expanded = os.path.expanduser(path)
    candidates = [expanded]
    if plan_dir and not os.path.isabs(expanded):
        candidates.append(os.path.join(plan_dir, expanded))
    for cand in candidates:
        if os.path.exists(cand):
            if revision is not None:
                raise ModelNotFound(f"{path}@{revision}: a revision only applies to Hugging Face repos, "
                                    f"but {cand} is a local path")
            return cand
    if not looks_like_repo_id(path):
        looked = " and ".join(os.path.abspath(c) for c in candidates)
        raise ModelNotFound(f"model '{path[:200]}' not found: no such file or folder ({looked[:400]}), and it is "
                            "not a Hugging Face repo id (org/name)")
    check_revision(path, revision)
    return download(path, revision)


def download(repo_id: str, revision: str | None = None) -> str:
    """snapshot_download of the files a merge needs; errors become ModelNotFound with the cause."""
    try:
        from huggingface_hub import snapshot_download
        from huggingface_hub.errors import (
            GatedRepoError,
            LocalEntryNotFoundError,
            RepositoryNotFoundError,
            RevisionNotFoundError,
        )
    except ImportError as exc:  # pragma: no cover - huggingface_hub is a core dependency
        raise ModelNotFound(f"{repo_id}: huggingface_hub is needed to download models ({exc})") from None
    ref = repo_id if revision is None else f"{repo_id}@{revision}"
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=HUB_PATTERNS)
    except RevisionNotFoundError:
        raise ModelNotFound(f"{ref}: the Hub repo has no revision '{revision}'") from None
    except GatedRepoError:
        raise ModelNotFound(f"{ref}: the Hub repo is gated; accept its terms and log in (HF_TOKEN)") from None
    except RepositoryNotFoundError:
        raise ModelNotFound(f"{ref}: no such local path, and no such Hub repo (or it is private: set HF_TOKEN)") from None
    except LocalEntryNotFoundError:
        raise ModelNotFound(f"{ref}: not a local path, and not in the Hugging Face cache while offline "
                            "(HF_HUB_OFFLINE=1 or no network)") from None
    except Exception as exc:  # network errors, disk errors ...
        name = type(exc).__name__
        if "Offline" in name or "Connect" in name or "Timeout" in name:
            raise ModelNotFound(f"{ref}: cannot reach the Hugging Face Hub and it is not cached ({name})") from None
        raise ModelNotFound(f"{ref}: download failed: {name}: {exc}") from None
