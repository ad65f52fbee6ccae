"""Token ids of prompts, exactly as mergekit-moe gets them, from a model folder's tokenizer files.

mergekit-moe tokenizes each prompt as ``bos_token + prompt`` without adding special tokens, with the
tokenizer ``transformers.AutoTokenizer`` loads. Which ids come out depends on transformers: for
tokenizer classes such as ``LlamaTokenizer`` it rebuilds the pipeline from the vocabulary (and
transformers 4 and 5 rebuild it differently), so those need ``transformers`` (the optional extra) and
are tokenized by it. A *generic* tokenizer (``PreTrainedTokenizerFast``, transformers 5's
``TokenizersBackend``, or no class) is ``tokenizer.json`` run as it is by the ``tokenizers`` library,
with the special tokens the config names marked special; we run it the same way through
``tokenizers`` alone (a dependency of ours; about 5 MB of memory instead of about 90 MB for importing
transformers), as long as nothing in the config would make transformers change it
(``add_prefix_space``, a special token the vocabulary lacks), else through transformers. The tests
check both paths against AutoTokenizer.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass
from typing import Any, Sequence

from ..errors import MergeError

GENERIC = (None, "PreTrainedTokenizerFast", "TokenizersBackend")
SPECIAL_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token")
CHANGES_PIPELINE = ("add_prefix_space", "legacy", "from_slow")  # settings transformers applies to the pipeline
EXTRA_HINT = "pip install 'mergekit-lite[transformers]'"


@dataclass(frozen=True)
class PromptTokenizer:
    """Encodes ``bos + prompt`` without special tokens; ``pad`` is mergekit's padding id (bos, else eos)."""

    encoder: Any  # (text) -> list[int]
    bos: str
    pad: int
    how: str  # "tokenizers" or "transformers", for messages and tests

    def encode(self, prompt: str) -> tuple[int, ...]:
        return tuple(self.encoder(self.bos + prompt))

    def batch(self, prompts: Sequence[str]) -> tuple[tuple[int, ...], ...]:
        return tuple(self.encode(p) for p in prompts)


def _token(value: Any) -> str | None:
    if isinstance(value, dict):
        value = value.get("content")
    return value if isinstance(value, str) else None


def _read_json(path: str) -> dict[str, Any]:
    if not os.path.exists(path):
        return {}
    try:
        with open(path, encoding="utf-8") as fh:
            data = json.load(fh)
    except (OSError, ValueError) as exc:
        raise MergeError(f"{path}: not valid JSON ({exc})") from None
    return data if isinstance(data, dict) else {}


def tokenizer_settings(folder: str) -> dict[str, Any]:
    """tokenizer_config.json over special_tokens_map.json (the config wins, as in transformers)."""
    merged = _read_json(os.path.join(folder, "special_tokens_map.json"))
    merged.update(_read_json(os.path.join(folder, "tokenizer_config.json")))
    return merged


def load_prompt_tokenizer(folder: str) -> PromptTokenizer:
    """The prompt tokenizer of the model in `folder`."""
    settings = tokenizer_settings(folder)
    raw = _generic(folder, settings)
    return raw if raw is not None else _transformers(folder, settings)


def _generic(folder: str, settings: dict[str, Any]) -> PromptTokenizer | None:
    """tokenizer.json through the tokenizers library, or None where transformers would change it."""
    path = os.path.join(folder, "tokenizer.json")
    if settings.get("tokenizer_class") not in GENERIC or not os.path.exists(path) or any(
            k in settings for k in CHANGES_PIPELINE):
        return None
    try:
        from tokenizers import AddedToken, Tokenizer
    except ImportError:
        return None
    try:
        tok = Tokenizer.from_file(path)
    except Exception as exc:  # the library's own error type for a malformed file
        raise MergeError(f"{path}: not a tokenizer the tokenizers library can load ({exc})") from None
    specials = [_token(settings.get(k)) for k in SPECIAL_KEYS]
    specials += [_token(t) for t in settings.get("additional_special_tokens") or []]
    specials = [t for t in specials if t]
    decoder = settings.get("added_tokens_decoder") or {}
    if any(tok.token_to_id(t) is None for t in specials) or any(
            tok.token_to_id(_token(v) or "") != int(k) for k, v in decoder.items()):
        return None  # transformers would add tokens: leave it to transformers
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in specials])
    bos = _token(settings.get("bos_token"))
    eos = _token(settings.get("eos_token"))
    pad = tok.token_to_id(bos) if bos else (tok.token_to_id(eos) if eos else None)
    return PromptTokenizer(lambda text: tok.encode(text, add_special_tokens=False).ids, bos or "",
                           pad if pad is not None else 0, "tokenizers")


def _transformers(folder: str, settings: dict[str, Any]) -> PromptTokenizer:
    try:
        from transformers import AutoTokenizer
    except ImportError:
        cls = settings.get("tokenizer_class")
        why = ("the tokenizers library" if cls in GENERIC and os.path.exists(os.path.join(folder, "tokenizer.json"))
               else f"transformers, which builds its {cls or 'tokenizer'}")
        raise MergeError(f"{folder}: tokenizing the prompts needs {why}, which is not installed; "
                         f"{EXTRA_HINT}") from None
    try:
        tok = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as exc:  # transformers raises many kinds for a missing or broken tokenizer
        raise MergeError(f"{folder}: cannot load its tokenizer with transformers ({type(exc).__name__}: {exc})") from None
    pad = tok.bos_token_id if tok.bos_token_id is not None else tok.eos_token_id
    return PromptTokenizer(lambda text: tok(text, add_special_tokens=False)["input_ids"], tok.bos_token or "",
                           pad if pad is not None else 0, "transformers")
