"""Turning a plan's model reference into a local path: a folder, a file, or a Hub download.

Local paths are looked up relative to the working directory first, then to the plan file's
folder (so ``merge_configs/*.yml`` run from anywhere). Anything else shaped like ``org/name`` is
fetched with ``huggingface_hub.snapshot_download`` from the endpoint given (``--endpoint``, else
``HF_ENDPOINT``, else huggingface.co), only the files a merge and its output folder need (weights,
index, config, tokenizer, generation config, custom code, the model card for its license);
``HF_HUB_OFFLINE=1`` makes that a cache lookup. Where each model came from (:class:`HubRef`: repo,
revision asked for, commit downloaded) is kept, so the model card can tell Hub models from local
folders without guessing and without a network call.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass

from ..errors import ModelNotFound
from .hub import endpoint_url, is_offline, scrub

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
    "*.py",
    "README.md",
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


@dataclass(frozen=True)
class HubRef:
    """Where a model came from on the Hub."""

    repo_id: str
    revision: str | None  # as asked for (None: the default branch)
    commit: str | None  # the commit downloaded
    endpoint: str


@dataclass(frozen=True)
class Located:
    path: str
    hub: HubRef | None = None  # None: a local model


def resolve_model(path: str, revision: str | None = None, plan_dir: str | None = None, adapter: bool = False) -> str:
    """Local path of a model reference (downloading it from the Hub if it is a repo id)."""
    return locate_model(path, revision, plan_dir, adapter=adapter).path


def locate_model(path: str, revision: str | None = None, plan_dir: str | None = None,
                 endpoint: str | None = None, adapter: bool = False) -> Located:
    """Where a model reference is: a local path (working directory, then `plan_dir`), else a Hub download.
    With `adapter`, a PEFT adapter (only its two files are downloaded); without, a local adapter folder
    is an error saying how to use it (its safetensors file would otherwise read as a model with
    missing tensors)."""
    from .adapters import HUB_PATTERNS as ADAPTER_FILES, adapter_as_model_error, is_adapter_folder

    expanded = os.path.expanduser(path)
    candidates = [expanded]
    if plan_dir and not os.path.isabs(expanded):
        candidates.append(os.path.join(plan_dir, expanded))
    for cand in candidates:
        if os.path.exists(cand):
            if revision is not None:
                raise ModelNotFound(f"{path}@{revision}: a revision only applies to Hugging Face repos, "
                                    f"but {cand} is a local path")
            if not adapter and is_adapter_folder(cand):
                raise adapter_as_model_error(cand, path)
            return Located(cand)
    if not looks_like_repo_id(path):
        looked = " and ".join(os.path.abspath(c) for c in candidates)
        raise ModelNotFound(f"model '{path[:200]}' not found: no such file or folder ({looked[:400]}), and it is "
                            "not a Hugging Face repo id (org/name)")
    check_revision(path, revision)
    url = endpoint_url(endpoint)
    folder = download(path, revision, url, ADAPTER_FILES if adapter else None)
    commit = os.path.basename(os.path.normpath(folder))
    return Located(folder, HubRef(path, revision, commit if re.fullmatch(r"[0-9a-f]{40}", commit) else None, url))


def download(repo_id: str, revision: str | None = None, endpoint: str | None = None,
             patterns: list[str] | None = None) -> str:
    """snapshot_download of the files a merge needs (`patterns`, default :data:`HUB_PATTERNS`); errors
    become ModelNotFound with the cause."""
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
    login = "log in with `hf auth login` or set HF_TOKEN"
    try:
        return snapshot_download(repo_id, revision=revision, allow_patterns=patterns or HUB_PATTERNS,
                                 endpoint=endpoint_url(endpoint), local_files_only=is_offline())
    except RevisionNotFoundError:
        raise ModelNotFound(f"{ref}: the Hub repo has no revision '{revision}'") from None
    except GatedRepoError:
        raise ModelNotFound(f"{ref}: the Hub repo is gated: accept its terms on its page, then {login} "
                            "with that account") from None
    except RepositoryNotFoundError:
        raise ModelNotFound(f"{ref}: no such local path, and no such Hub repo, or it is private: {login} with an "
                            "account that can read it") from None
    except LocalEntryNotFoundError:
        raise ModelNotFound(f"{ref}: not a local path, and not in the Hugging Face cache while offline "
                            "(HF_HUB_OFFLINE=1 or no network)") from None
    except Exception as exc:  # network errors, disk errors ...
        name = type(exc).__name__
        cached = getattr(exc, "snapshot_path", None)
        if cached and os.path.isdir(cached):  # offline, cached with an older pattern set: use what is there
            return str(cached)
        if "Offline" in name or "Connect" in name or "Timeout" in name:
            raise ModelNotFound(f"{ref}: cannot reach the Hugging Face Hub at {endpoint_url(endpoint)} and it is "
                                f"not cached ({name})") from None
        raise ModelNotFound(scrub(f"{ref}: download failed: {name}: {exc}")) from None
