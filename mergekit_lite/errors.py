"""Errors meant for people.

Every error raised for bad input is a :class:`MergeError`. The CLI prints its message and exits
with status 2; anything else escaping is a bug in mergekit-lite and keeps its traceback.
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Iterable


class MergeError(Exception):
    """Base class of every error caused by the user's input (plan, models, options)."""


@dataclass(frozen=True)
class Issue:
    """One problem found in a plan: where it is and what is wrong."""

    file: str
    line: int | None  # 1-based, None when unknown
    path: str  # key path such as ``models[1].parameters.weight``
    message: str

    def __str__(self) -> str:
        where = self.file if self.line is None else f"{self.file}:{self.line}"
        key = f" {self.path}:" if self.path else ""
        return f"{where}:{key} {self.message}"


class PlanError(MergeError):
    """A plan has one or more problems; all of them are listed at once."""

    def __init__(self, issues: list[Issue] | Issue):
        self.issues = [issues] if isinstance(issues, Issue) else list(issues)
        n = len(self.issues)
        head = "the merge plan has a problem" if n == 1 else f"the merge plan has {n} problems"
        super().__init__(head + ":\n" + "\n".join(f"  - {i}" for i in self.issues))


class ModelNotFound(MergeError):
    """A model reference is neither a local path nor a resolvable Hugging Face repo."""


class TensorNotFound(MergeError):
    """A tensor the merge needs is missing from a model."""


class ShapeMismatch(MergeError):
    """Input tensors that must be merged together have different shapes."""


class BudgetExceeded(MergeError):
    """A single step of the merge cannot fit in the memory budget."""


class OutputExists(MergeError):
    """The output folder exists and ``overwrite`` was not given."""


class MalformedFile(ModelNotFound):
    """A model file (safetensors, index, config) is not what it claims to be; the message names the
    file and what is wrong (a subclass of ModelNotFound: the model cannot be opened)."""


class UnsafeOutput(MergeError):
    """An output folder would replace, contain or lie inside something that must not be touched: an
    input model, the plan, the Hugging Face cache, or a folder mergekit-lite did not write."""


class OutputError(MergeError):
    """The output cannot be written: no space left, a read-only file system, no permission."""


class Interrupted(KeyboardInterrupt):
    """SIGINT or SIGTERM arrived; the run stops, removes its temporaries, and the command line exits
    with 128 + the signal number (130, 143)."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def status(self) -> int:
        return 128 + self.signum


class MergeWarning(UserWarning):
    """Something the user should know that does not stop the run (the command line prints it as
    ``mergekit-lite: warning: ...``)."""


def closest(word: str, known: Iterable[str]) -> str | None:
    """The known name `word` was probably meant to be: the same name in another case, else the
    nearest by spelling (difflib), else None. For "did you mean ...?" in messages."""
    known = list(known)
    same = [k for k in known if k.lower() == word.lower()]
    if same:
        return same[0]
    near = difflib.get_close_matches(word.lower(), [k.lower() for k in known], n=1, cutoff=0.6)
    return next((k for k in known if near and k.lower() == near[0]), None)


def did_you_mean(word: str, known: Iterable[str]) -> str:
    """' (did you mean 'x'?)' or ''."""
    guess = closest(word, known)
    return f" (did you mean '{guess}'?)" if guess else ""


class UploadFailed(MergeError):
    """An upload to the Hub failed; the local output folder is intact."""
