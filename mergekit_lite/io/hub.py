"""The Hugging Face Hub: which one (endpoint, offline mode), and publishing an output folder to it.

Uploads use ``huggingface_hub.HfApi`` only: ``create_repo(exist_ok=True)``, ``create_branch`` when
the branch asked for does not exist, and ``upload_folder`` (one commit). The endpoint is
``--endpoint``, else ``HF_ENDPOINT`` read when the command runs (huggingface_hub reads it once, at
import), else huggingface.co; the token is ``HF_TOKEN`` or the user's saved login
(``hf auth login``), resolved by huggingface_hub.

The token is a secret: it is passed to the client and nothing else. It is never printed, logged or
written; every message an upload failure produces is scrubbed of it, and the retry command it
prints has no token. A failed upload leaves the local folder as it was (it was complete before the
upload started) and raises :class:`UploadFailed`, which the CLI turns into exit status 2.

When the client would upload through Xet storage (``hf_xet`` installed) and the Hub at the endpoint
has no Xet service (a self-hosted or test Hub), the upload is retried once over git LFS, which
every Hub implements; ``HF_HUB_DISABLE_XET=1`` chooses LFS from the start.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from dataclasses import dataclass
from typing import Any

from ..errors import MergeError, UploadFailed

DEFAULT_ENDPOINT = "https://huggingface.co"
_REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
_TRUE = {"1", "on", "yes", "true"}


def endpoint_url(explicit: str | None = None) -> str:
    """The Hub to talk to: `explicit`, else ``HF_ENDPOINT``, else huggingface.co."""
    return (explicit or os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def is_offline() -> bool:
    """``HF_HUB_OFFLINE`` (or ``TRANSFORMERS_OFFLINE``) as set now, or as huggingface_hub read it."""
    if any(os.environ.get(k, "").strip().lower() in _TRUE for k in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")):
        return True
    try:
        from huggingface_hub import constants
    except ImportError:  # pragma: no cover - a core dependency
        return False
    return bool(constants.is_offline_mode())


def _token() -> str | None:
    try:
        from huggingface_hub import get_token
    except ImportError:  # pragma: no cover
        return None
    return get_token()


def scrub(text: str, token: str | None = None) -> str:
    """`text` without the token (the one given, and the one huggingface_hub would use)."""
    for secret in {token, os.environ.get("HF_TOKEN"), os.environ.get("HUGGING_FACE_HUB_TOKEN"), _token()}:
        if secret and len(secret) >= 4:
            text = text.replace(secret, "***")
    return text


@dataclass(frozen=True)
class Upload:
    """Where and how to publish an output folder (the ``upload`` command's options)."""

    repo_id: str
    private: bool = False
    revision: str | None = None  # a branch; created from the default branch when missing
    commit_message: str | None = None
    endpoint: str | None = None  # None: HF_ENDPOINT, else huggingface.co
    token: str | None = None  # None: HF_TOKEN or the saved login

    @classmethod
    def of(cls, target: "Upload | str", **options: Any) -> "Upload":
        if isinstance(target, Upload):
            return target
        if not isinstance(target, str):
            raise MergeError(f"upload: expected a repo id such as org/name, got {target!r}")
        return cls(target, **options)

    def retry_command(self, folder: str) -> str:
        """The command that uploads `folder` again with the same options (never with the token)."""
        parts = ["mergekit-lite", "upload", folder, self.repo_id]
        if self.private:
            parts.append("--private")
        if self.revision:
            parts += ["--revision", self.revision]
        if self.commit_message:
            parts += ["--commit-message", self.commit_message]
        if endpoint_url(self.endpoint) != DEFAULT_ENDPOINT:
            parts += ["--endpoint", endpoint_url(self.endpoint)]
        return " ".join(shlex.quote(p) for p in parts)


def upload(folder: str | os.PathLike, target: Upload | str, **options: Any) -> str:
    """Publish the output folder `folder` to the Hub repo `target` (``org/name`` or an :class:`Upload`);
    returns the commit's URL. Options: ``private``, ``revision``, ``commit_message``, ``endpoint``,
    ``token``. Raises :class:`UploadFailed` (the folder is left as it is) when it cannot."""
    up = Upload.of(target, **options)
    folder = os.fspath(folder)
    if not _REPO_ID.match(up.repo_id):
        raise MergeError(f"upload: {up.repo_id!r} is not a Hub repo id; expected org/name")
    if not os.path.isdir(folder) or not os.listdir(folder):
        raise MergeError(f"upload: {folder} is not a folder with files to upload")
    token = up.token or _token()
    if not token:
        raise UploadFailed(_failure(up, folder, "no Hugging Face token: set HF_TOKEN or log in with "
                                    "`hf auth login` (a token with write access)"))
    try:
        return _publish(up, folder, token)
    except MergeError:
        raise
    except Exception as exc:  # every failure of the client or the network is the user's to see
        raise UploadFailed(_failure(up, folder, explain(exc), token)) from None


def _publish(up: Upload, folder: str, token: str) -> str:
    from huggingface_hub import HfApi, constants

    from .. import __version__

    api = HfApi(endpoint=endpoint_url(up.endpoint), token=token, library_name="mergekit-lite",
                library_version=__version__)
    api.create_repo(up.repo_id, private=up.private, exist_ok=True, repo_type="model")
    if up.revision and up.revision != "main":
        _ensure_branch(api, up.repo_id, up.revision)
    message = up.commit_message or "Upload model merged with mergekit-lite"

    saved = constants.HF_HUB_DISABLE_XET
    try:
        info = _commit_with_fallbacks(api, constants, lambda: api.upload_folder(
            repo_id=up.repo_id, folder_path=folder, revision=up.revision, commit_message=message))
    finally:
        constants.HF_HUB_DISABLE_XET = saved
    return str(getattr(info, "commit_url", "") or f"{endpoint_url(up.endpoint)}/{up.repo_id}")


def _commit_with_fallbacks(api: Any, constants: Any, commit: Any) -> Any:
    """Run `commit`; retried once over git LFS when the Hub has no Xet storage, and once without the
    client's server-side YAML check when the Hub has no such endpoint (the card is ours, and the
    tests check it with huggingface_hub's parser)."""
    while True:
        try:
            return commit()
        except Exception as exc:
            if not constants.HF_HUB_DISABLE_XET and _about_xet(exc):
                constants.HF_HUB_DISABLE_XET = True
            elif _about_yaml_check(exc) and "_validate_yaml" not in vars(api):
                api._validate_yaml = lambda *args, **kwargs: None
            else:
                raise


def _ensure_branch(api: Any, repo_id: str, branch: str) -> None:
    from huggingface_hub.errors import HfHubHTTPError, RevisionNotFoundError

    try:
        api.repo_info(repo_id, revision=branch)
    except RevisionNotFoundError:
        api.create_branch(repo_id, branch=branch, exist_ok=True)
    except HfHubHTTPError as exc:
        if getattr(exc.response, "status_code", None) != 404:
            raise
        api.create_branch(repo_id, branch=branch, exist_ok=True)


def _failure_trail(exc: BaseException):
    """The failure and its causes, each with the URL it was answering and where it was raised
    ((file, function) of every frame)."""
    seen = 0
    while exc is not None and seen < 10:
        url = str(getattr(getattr(exc, "response", None), "url", "") or "")
        frames = []
        tb = exc.__traceback__
        while tb is not None:
            frames.append((tb.tb_frame.f_code.co_filename, tb.tb_frame.f_code.co_name))
            tb = tb.tb_next
        yield exc, url, frames
        exc, seen = exc.__cause__ or exc.__context__, seen + 1


def _about_xet(exc: BaseException) -> bool:
    """Whether a failure came from the Xet upload path (its token endpoint, hf_xet, the client's Xet code)."""
    for e, url, frames in _failure_trail(exc):
        if "xet" in url.lower() or "xet" in str(e).lower() or "xet" in type(e).__module__.lower():
            return True
        if any("xet" in os.path.basename(f).lower() or "_upload_pipeline" in f for f, _ in frames):
            return True
    return False


def _about_yaml_check(exc: BaseException) -> bool:
    """Whether the Hub has no card validation endpoint: it answered 404/405/501 there, or something that
    is not JSON. (A card the Hub finds invalid is a 400 and is raised as it is.)"""
    for e, url, frames in _failure_trail(exc):
        status = getattr(getattr(e, "response", None), "status_code", None)
        if url.endswith("/api/validate-yaml") and status in (404, 405, 501):
            return True
        if isinstance(e, json.JSONDecodeError) and any(name == "_validate_yaml" for _, name in frames):
            return True
    return False


def explain(exc: BaseException) -> str:
    """What went wrong, for people: the HTTP status and the Hub's message, or the network error."""
    status = getattr(getattr(exc, "response", None), "status_code", None)
    name = type(exc).__name__
    if name == "OfflineModeIsEnabled":
        return "offline mode is on (HF_HUB_OFFLINE=1): unset it to upload"
    if status == 401:
        return "the Hub refused the token (401 Unauthorized): set HF_TOKEN to a valid token, or log in again " \
               "with `hf auth login`"
    if status == 403:
        return "the token may not write to this repo or namespace (403 Forbidden): use a token with write access"
    if status is not None:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else name
        return f"the Hub answered {status}: {first}"
    if "Connect" in name or "Timeout" in name or "Network" in name:
        return f"cannot reach the Hub ({name}: {exc})"
    return f"{name}: {exc}"


def _failure(up: Upload, folder: str, reason: str, token: str | None = None) -> str:
    where = endpoint_url(up.endpoint)
    text = (f"upload of {folder} to {up.repo_id} on {where} failed: {reason}\n"
            f"the merged model is complete in {folder}; to upload it again, run:\n"
            f"  {up.retry_command(folder)}")
    return scrub(text, token)
