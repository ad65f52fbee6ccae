"""Tokenizer files without the tokenizers library: reading a model's vocabulary, writing an output's.

Why parse them here: the core must not need ``transformers`` or ``tokenizers`` (heavy, optional),
and all a merge needs from a tokenizer is its vocabulary (token -> id, and which tokens are
*added* tokens with their flags). Those are plain JSON or text:

- ``tokenizer.json`` (the ``tokenizers`` format: ``model.vocab`` as a mapping, or a list of
  ``[piece, score]`` for Unigram models, plus ``added_tokens``);
- else ``vocab.json`` (+ ``added_tokens.json``), the slow GPT-2/BPE files;
- else ``vocab.txt`` (WordPiece, one token per line).

A model with only a SentencePiece ``tokenizer.model`` has no vocabulary we can read (protobuf); an
alignment that needs it says so. Writing an output tokenizer starts from the donor's files, copied
as they are, and appends the new tokens as *added tokens* (as mergekit does with
``tokenizer.add_tokens``): ``tokenizer.json``'s ``added_tokens``, ``tokenizer_config.json``'s
``added_tokens_decoder`` and, when present, ``added_tokens.json``. Tokens past the embedding rows are
removed the same way (mergekit's "stripped" tokenizer).
"""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass, field
from typing import Any, Iterable

from ..errors import ModelNotFound
from .reader import check_inside

# what a tokenizer is made of, copied from the tokenizer's donor
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "added_tokens.json",
    "chat_template.jinja",
    "chat_template.json",
)
ADDED_FLAGS = {"single_word": False, "lstrip": False, "rstrip": False, "normalized": True, "special": False}


@dataclass(frozen=True)
class Vocab:
    """A vocabulary as transformers' ``get_vocab()`` gives it: every token (added ones included) -> id,
    and the added tokens' settings (content -> tokenizer.json entry, without its id)."""

    ids: dict[str, int]
    added: dict[str, dict[str, Any]] = field(default_factory=dict)
    file: str = ""

    def __len__(self) -> int:
        return len(self.ids)

    def below(self, rows: int) -> "Vocab":
        """The tokens a model with `rows` embedding rows can use (ids < rows)."""
        if all(i < rows for i in self.ids.values()):
            return self
        return Vocab({t: i for t, i in self.ids.items() if i < rows},
                     {t: e for t, e in self.added.items() if self.ids.get(t, rows) < rows}, self.file)

    def ordered(self) -> list[str]:
        """Tokens in id order."""
        return sorted(self.ids, key=self.ids.__getitem__)


def read_vocab(folder: str) -> Vocab | None:
    """The vocabulary in `folder`'s tokenizer files, or None when it has none we can read."""
    path = os.path.join(folder, "tokenizer.json")
    if os.path.isfile(path):
        data = _json(path)
        model = data.get("model") or {}
        raw = model.get("vocab")
        if isinstance(raw, dict):
            ids = {str(t): int(i) for t, i in raw.items()}
        elif isinstance(raw, list):  # Unigram: [[piece, score], ...], id = position
            ids = {str(e[0]): i for i, e in enumerate(raw)}
        else:
            raise ModelNotFound(f"{path}: model.vocab is neither a mapping nor a list; cannot read the vocabulary")
        added = {}
        for entry in data.get("added_tokens") or []:
            ids[entry["content"]] = int(entry["id"])
            added[entry["content"]] = {k: v for k, v in entry.items() if k not in ("id", "content")}
        return Vocab(ids, added, path)
    path = os.path.join(folder, "vocab.json")
    if os.path.isfile(path):
        ids = {str(t): int(i) for t, i in _json(path).items()}
        extra = os.path.join(folder, "added_tokens.json")
        more = {str(t): int(i) for t, i in _json(extra).items()} if os.path.isfile(extra) else {}
        ids.update(more)
        return Vocab(ids, {t: dict(ADDED_FLAGS) for t in more}, path)
    path = os.path.join(folder, "vocab.txt")
    if os.path.isfile(path):
        with open(path, encoding="utf-8") as fh:
            return Vocab({line.rstrip("\n"): i for i, line in enumerate(fh)}, {}, path)
    return None


def read_chat_template(folder: str) -> str | None:
    """The chat template a tokenizer folder defines (chat_template.jinja first, as transformers reads it)."""
    jinja = os.path.join(folder, "chat_template.jinja")
    if os.path.isfile(jinja):
        with open(jinja, encoding="utf-8") as fh:
            return fh.read()
    for name in ("tokenizer_config.json", "chat_template.json"):
        path = os.path.join(folder, name)
        if os.path.isfile(path):
            found = _json(path).get("chat_template")
            if isinstance(found, list):  # named templates: [{name, template}]
                found = next((t.get("template") for t in found if t.get("name") == "default"), None)
            if isinstance(found, str):
                return found
    return None


@dataclass(frozen=True)
class TokenizerOutput:
    """What an output folder's tokenizer is: the donor's files, plus tokens appended as added tokens,
    minus tokens at or past `keep_below`, with `chat_template` set when given."""

    folder: str | None
    added: tuple[tuple[str, int, tuple[tuple[str, Any], ...]], ...] = ()  # (content, id, flags)
    keep_below: int | None = None
    chat_template: str | None = None

    def template(self) -> str | None:
        """The chat template this tokenizer will have."""
        if self.chat_template is not None:
            return self.chat_template
        return read_chat_template(self.folder) if self.folder else None


def write_tokenizer(out: TokenizerOutput, folder: str) -> list[str]:
    """Write the tokenizer files of `out` into `folder`; returns the names written."""
    written = []
    if out.folder:
        for name in TOKENIZER_FILES:
            src = os.path.join(out.folder, name)
            if os.path.isfile(src):
                check_inside(src, out.folder)  # a link out of the model folder is never followed
                shutil.copyfile(src, os.path.join(folder, name))
                written.append(name)
    if out.added or out.keep_below is not None:
        written += _edit_vocabulary(folder, out, written)
    if out.chat_template is not None:
        _set_chat_template(folder, out.chat_template)
        written.append("chat_template.jinja")
    return sorted(set(written))


def _edit_vocabulary(folder: str, out: TokenizerOutput, present: Iterable[str]) -> list[str]:
    present = set(present)
    entries = [{"id": i, "content": t, **dict(flags)} for t, i, flags in out.added]
    if "tokenizer.json" in present:
        _update_json(folder, "tokenizer.json", lambda d: _edit_tokenizer_json(d, entries, out.keep_below))
    if "tokenizer_config.json" in present:
        _update_json(folder, "tokenizer_config.json", lambda d: _edit_decoder(d, entries, out.keep_below))
    if "added_tokens.json" in present or ("tokenizer.json" not in present and entries):
        path = os.path.join(folder, "added_tokens.json")
        current = _json(path) if os.path.isfile(path) else {}
        current = {t: i for t, i in current.items() if out.keep_below is None or i < out.keep_below}
        current.update({e["content"]: e["id"] for e in entries})
        _dump(path, current)
        return ["added_tokens.json"]
    return []


def _edit_tokenizer_json(data: dict, entries: list[dict], keep_below: int | None) -> None:
    """Strip and append added tokens. `tokenizers` ignores the ids written for added tokens that are not
    in the model's vocabulary (it numbers them from the vocabulary's size), so when the vocabulary's ids
    have gaps the new tokens also go into a mapping vocabulary, at their ids, which it keeps."""
    added = list(data.get("added_tokens") or [])
    if keep_below is not None:
        added = [e for e in added if e["id"] < keep_below]
        model = data.get("model") or {}
        vocab = model.get("vocab")
        if isinstance(vocab, dict):
            dropped = {t for t, i in vocab.items() if i >= keep_below}
            model["vocab"] = {t: i for t, i in vocab.items() if i < keep_below}
            if isinstance(model.get("merges"), list):
                model["merges"] = [m for m in model["merges"] if not dropped & set(
                    m.split(" ") if isinstance(m, str) else m)]
        elif isinstance(vocab, list):
            model["vocab"] = vocab[:keep_below]
    added.extend(entries)
    data["added_tokens"] = added
    vocab = (data.get("model") or {}).get("vocab")
    if entries and isinstance(vocab, dict):
        known = set(vocab.values()) | {e["id"] for e in added if e not in entries}
        if known != set(range(len(known))):
            vocab.update({e["content"]: e["id"] for e in entries})


def _edit_decoder(data: dict, entries: list[dict], keep_below: int | None) -> None:
    decoder = data.get("added_tokens_decoder")
    if not isinstance(decoder, dict):
        return  # transformers rebuilds it from tokenizer.json
    if keep_below is not None:
        decoder = {k: v for k, v in decoder.items() if int(k) < keep_below}
    for e in entries:
        decoder[str(e["id"])] = {k: v for k, v in e.items() if k != "id"}
    data["added_tokens_decoder"] = decoder


def _set_chat_template(folder: str, template: str) -> None:
    """chat_template.jinja holds the template (transformers reads it first); the copies a donor kept in
    tokenizer_config.json or chat_template.json are removed so that no stale template is left."""
    with open(os.path.join(folder, "chat_template.jinja"), "w", encoding="utf-8") as fh:
        fh.write(template)
    cfg = os.path.join(folder, "tokenizer_config.json")
    if os.path.isfile(cfg) and "chat_template" in _json(cfg):
        _update_json(folder, "tokenizer_config.json", lambda d: d.pop("chat_template", None))
    legacy = os.path.join(folder, "chat_template.json")
    if os.path.isfile(legacy):
        os.remove(legacy)


def _update_json(folder: str, name: str, edit) -> None:
    path = os.path.join(folder, name)
    data = _json(path)
    edit(data)
    _dump(path, data)


def _json(path: str) -> Any:
    try:
        with open(path, encoding="utf-8") as fh:
            return json.load(fh)
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"{path}: not valid JSON ({exc})") from None


def _dump(path: str, data: Any) -> None:
    with open(path, "w", encoding="utf-8") as fh:
        json.dump(data, fh, indent=2, ensure_ascii=False)
        fh.write("\n")
