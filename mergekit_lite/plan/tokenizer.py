"""Reading a step's tokenizer keys: ``tokenizer_source``, the ``tokenizer:`` section and ``chat_template``.

mergekit's forms, read strictly (every problem reported with its line, like the rest of the plan):

- ``tokenizer_source: base | union | MODEL``;
- ``tokenizer: {source: base | union | MODEL, tokens: {TOKEN: {source: ..., force: bool}},
  pad_to_multiple_of: N}``, where a token's source is a model (its row for the token),
  ``{kind: model_token, model: MODEL, token: T | token_id: N}`` or ``{kind: zero}``;
- ``chat_template: auto | NAME | JINJA`` (see :mod:`mergekit_lite.chat_templates`).

Giving both ``tokenizer_source`` and ``tokenizer`` is refused, as mergekit does. What the settings
mean (which rows each output token takes) is decided in :mod:`mergekit_lite.vocab`.
"""

from __future__ import annotations

from typing import Any

from .. import chat_templates
from ..errors import Issue
from .recipe import MergePlan, ModelRef, TokenizerSpec, TokenSetting, TokenSource
from .source import Path

SECTION_KEYS = ("source", "tokens", "pad_to_multiple_of")
TOKEN_KEYS = ("source", "force")


def read_source(parser: Any, path: Path, value: Any) -> ModelRef | str | None:
    """``base``, ``union`` or a model reference."""
    if value in ("base", "union"):
        return value
    return parser.model_ref(path, value)


def tokenizer_source(parser: Any, key: str) -> ModelRef | str | None:
    value = parser.data.get(key)
    if value is None:
        return None
    if "tokenizer" in parser.data:
        parser.report((key,), "give either tokenizer_source or a tokenizer: section, not both "
                      "(tokenizer: {source: ...} says the same)")
    return read_source(parser, (key,), value)


def tokenizer_section(parser: Any, key: str) -> TokenizerSpec | None:
    raw = parser.data.get(key)
    if raw is None:
        return None
    if not isinstance(raw, dict):
        parser.report((key,), f"expected a mapping with {', '.join(SECTION_KEYS)}, got {raw!r}")
        return None
    for k in raw:
        if k not in SECTION_KEYS:
            parser.report((key, k), f"unknown key '{k}' in tokenizer; allowed: {', '.join(SECTION_KEYS)}")
    source = read_source(parser, (key, "source"), raw.get("source", "union"))
    pad = raw.get("pad_to_multiple_of")
    if pad is not None and (isinstance(pad, bool) or not isinstance(pad, int) or pad < 1):
        parser.report((key, "pad_to_multiple_of"), f"expected a positive integer, got {pad!r}")
        pad = None
    tokens = _tokens(parser, (key, "tokens"), raw.get("tokens"))
    if source is None or tokens is None:
        return None
    return TokenizerSpec(source, tokens, pad)


def _tokens(parser: Any, path: Path, raw: Any) -> tuple[tuple[str, TokenSetting], ...] | None:
    if raw is None:
        return ()
    if not isinstance(raw, dict):
        parser.report(path, f"expected a mapping of tokens to settings, got {raw!r}")
        return None
    out = []
    for token, setting in raw.items():
        where = path + (token,)
        if setting is None:
            setting = {}
        if not isinstance(setting, dict):
            parser.report(where, f"expected {{source: ..., force: true|false}}, got {setting!r}")
            continue
        for k in setting:
            if k not in TOKEN_KEYS:
                parser.report(where + (k,), f"unknown key '{k}' in a token setting; allowed: {', '.join(TOKEN_KEYS)}")
        force = setting.get("force", False)
        if not isinstance(force, bool):
            parser.report(where + ("force",), f"expected true or false, got {force!r}")
        source = _token_source(parser, where + ("source",), setting.get("source"))
        out.append((str(token), TokenSetting(source, bool(force))))
    return tuple(out)


def _token_source(parser: Any, path: Path, raw: Any) -> TokenSource | None:
    if raw is None:
        return None
    if not (isinstance(raw, dict) and "kind" in raw):
        ref = parser.model_ref(path, raw)
        return TokenSource("model", ref) if ref is not None else None
    kind = raw["kind"]
    if kind == "zero":
        if set(raw) != {"kind"}:
            parser.report(path, "{kind: zero} takes no other keys")
        return TokenSource("zero")
    if kind != "model_token":
        parser.report(path + ("kind",), f"unknown token source kind {kind!r}; allowed: model_token, zero")
        return None
    extra = set(raw) - {"kind", "model", "token", "token_id"}
    if extra:
        parser.report(path, f"unknown key(s) {', '.join(sorted(extra))}; a model_token source takes model and "
                      "token or token_id")
    token, token_id = raw.get("token"), raw.get("token_id")
    if (token is None) == (token_id is None):
        parser.report(path, "a model_token source takes exactly one of token and token_id")
    elif token_id is not None and (isinstance(token_id, bool) or not isinstance(token_id, int) or token_id < 0):
        parser.report(path + ("token_id",), f"expected a token id (an integer >= 0), got {token_id!r}")
    ref = parser.model_ref(path + ("model",), raw.get("model")) if "model" in raw else None
    if ref is None:
        if "model" not in raw:
            parser.report(path, "a model_token source needs 'model'")
        return None
    return TokenSource("model_token", ref, None if token is None else str(token), token_id)


def chat_template(parser: Any, key: str) -> str | None:
    value = parser.data.get(key)
    if value is None:
        return None
    problem = chat_templates.setting_problem(value)
    if problem:
        parser.report((key,), problem)
        return None
    return value


def check_token_sources(plan: MergePlan, issues: list[Issue]) -> None:
    """A token's row can only come from a model the step merges (mergekit's rule: the row is taken
    from the tensors gathered for the merge)."""
    spec = plan.tokenizer
    if spec is None:
        return
    models = set(plan.referenced_models())
    for token, setting in spec.tokens:
        src = setting.source
        if src is not None and src.model is not None and src.model not in models:
            issues.append(plan.issue(("tokenizer", "tokens", token, "source"),
                                     f"model {src.model} is not one of this step's models; a token's row comes "
                                     f"from a merged model ({', '.join(str(m) for m in plan.referenced_models())})"))
