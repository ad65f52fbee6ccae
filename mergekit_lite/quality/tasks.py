"""Task files: what ``mergekit-lite eval`` and ``search`` score a model on.

Two kinds, told apart by their content:

- **generation** (``.jsonl``, every line an object with a ``prompt`` string and an ``answer``
  string or number; or a ``.json`` file holding a list of such objects): the model continues
  each prompt greedily; scored by exact match and per-character accuracy (:mod:`.scoring`). Other
  keys are ignored.
- **perplexity**: a plain-text file (any other extension), one document, or a ``.jsonl`` whose
  lines have a ``text`` string each, one document per line.

A malformed file is reported with its path, line and what is wrong (a :class:`TaskFileError`,
exit status 2 on the command line), never a traceback. Nothing in a task file is executed.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field

from ..errors import MergeError


class TaskFileError(MergeError):
    """A task file is missing, unreadable or malformed."""


@dataclass(frozen=True)
class Task:
    """One task file, read: its examples (generation) or documents (perplexity)."""

    path: str
    kind: str  # "generation" or "perplexity"
    examples: tuple[tuple[str, str], ...] = ()  # (prompt, answer)
    texts: tuple[str, ...] = ()
    lines: tuple[int, ...] = field(default=(), compare=False)  # line of each example, for messages

    @property
    def name(self) -> str:
        """The file name without its extension (``reverse.val``)."""
        base = os.path.basename(self.path)
        for ext in (".jsonl", ".json", ".txt"):
            if base.endswith(ext):
                return base[: -len(ext)]
        return base

    def __len__(self) -> int:
        return len(self.examples) if self.kind == "generation" else len(self.texts)


def load_task(path: str, limit: int | None = None) -> Task:
    """Read a task file (see the module docstring); `limit` keeps its first N examples."""
    try:
        with open(path, encoding="utf-8-sig") as fh:  # a byte-order mark is not part of the text
            text = fh.read()
    except FileNotFoundError:
        raise TaskFileError(f"{path}: the task file does not exist") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise TaskFileError(f"{path}: cannot read the task file: {exc}") from None
    if not path.endswith((".jsonl", ".json")):
        if not text.strip():
            raise TaskFileError(f"{path}: the text file is empty")
        return Task(path, "perplexity", texts=(text,))
    task = _read_jsonl(path, text)
    if limit is not None:
        task = Task(task.path, task.kind, task.examples[:limit], task.texts[:limit], task.lines[:limit])
    return task


def _records(path: str, text: str) -> list[tuple[int, dict]]:
    """(line, object) of every record: one per line, or (a ``.json`` file) the items of one list."""
    if path.endswith(".json") and text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except json.JSONDecodeError as exc:
            raise TaskFileError(f"{path}:{exc.lineno}: not valid JSON ({exc.msg})") from None
        out = []
        for i, item in enumerate(items, 1):
            if not isinstance(item, dict):
                raise TaskFileError(f"{path}: item {i} is not a JSON object")
            out.append((i, item))
        return out
    return [(n, _record(path, n, line)) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _read_jsonl(path: str, text: str) -> Task:
    examples: list[tuple[str, str]] = []
    texts: list[str] = []
    lines: list[int] = []
    for number, record in _records(path, text):
        if "prompt" in record or "answer" in record:
            examples.append((_string(path, number, record, "prompt"),
                             _string(path, number, record, "answer", numbers=True)))
        elif "text" in record:
            texts.append(_string(path, number, record, "text"))
        else:
            raise TaskFileError(f"{path}:{number}: expected 'prompt' and 'answer' (generation) or 'text' "
                                f"(perplexity), got keys {sorted(record)}")
        lines.append(number)
        if examples and texts:
            raise TaskFileError(f"{path}:{number}: a task file holds either prompt/answer lines or text lines, "
                                "not both")
    if not examples and not texts:
        raise TaskFileError(f"{path}: no examples (expected one JSON object per line)")
    kind = "generation" if examples else "perplexity"
    return Task(path, kind, tuple(examples), tuple(texts), tuple(lines))


def _record(path: str, number: int, line: str) -> dict:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as exc:
        raise TaskFileError(f"{path}:{number}: not valid JSON ({exc.msg} at column {exc.colno})") from None
    if not isinstance(record, dict):
        raise TaskFileError(f"{path}:{number}: expected a JSON object, got {type(record).__name__}")
    return record


def _string(path: str, number: int, record: dict, key: str, numbers: bool = False) -> str:
    """The string at `key`; with `numbers`, a JSON number is taken as written (``42`` -> ``"42"``)."""
    value = record.get(key)
    if numbers and isinstance(value, (int, float)) and not isinstance(value, bool):
        return str(value)
    if not isinstance(value, str):
        raise TaskFileError(f"{path}:{number}: '{key}' must be a string{' or a number' if numbers else ''}, "
                            f"got {value!r}")
    return value
