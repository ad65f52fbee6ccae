"""The model card of an output folder (README.md) and the plan beside it (mergekit_config.yml).

The card is what the Hub shows and indexes, so its front matter must say the truth:

- ``base_model``: the Hub repos the merge read, as ``org/name`` (revision stripped: the Hub's model
  tree links repos, not commits). Which inputs came from the Hub was decided when they were
  resolved (:mod:`.resolve`), against the plan's folder and the working directory, so a local
  folder that looks like ``org/name`` is never listed. No network call is made here.
- ``base_model_relation: merge``, ``library_name`` (``transformers``, or ``peft`` for an adapter),
  ``tags`` (``merge``, ``mergekit`` for tools that search for mergekit merges, ``mergekit-lite``), and
  ``license`` only when every input's own card gives the same one.

The body says which method made it (with its paper), lists the inputs (Hub ones linked, with the
revision asked for and the commit downloaded, so the merge can be reproduced), and holds the plan
verbatim. It is YAML that ``huggingface_hub``'s card parser reads (the tests check it).
"""

from __future__ import annotations

import os
from typing import Any

import yaml

TAGS = ["merge", "mergekit", "mergekit-lite"]
LICENSE_KEYS = ("license", "license_name", "license_link")


def read_front_matter(path: str) -> dict[str, Any]:
    """The YAML front matter of a markdown file ({} when it has none or it does not parse)."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read(1 << 20)
    except (OSError, UnicodeDecodeError):
        return {}
    if not text.startswith("---"):
        return {}
    end = text.find("\n---", 3)
    try:
        meta = yaml.safe_load(text[3:end]) if end > 0 else None
    except yaml.YAMLError:
        return {}
    return meta if isinstance(meta, dict) else {}


def read_license(folder: str) -> tuple[tuple[str, str], ...] | None:
    """The license keys of the card in `folder` (None when it has no card or no license)."""
    meta = read_front_matter(os.path.join(folder, "README.md"))
    if not meta.get("license"):
        return None
    return tuple((k, str(meta[k])) for k in LICENSE_KEYS if meta.get(k))


def card_metadata(card: Any, kind: str = "model") -> dict[str, Any]:
    """The front matter of the card of `card` (steps.CardData); `kind` is "model" or "adapter"."""
    meta: dict[str, Any] = {}
    hub_ids = list(dict.fromkeys(m.hub_id for m in card.models if m.hub_id))
    if hub_ids:
        meta["base_model"] = hub_ids
        meta["base_model_relation"] = "merge"
    meta["library_name"] = "peft" if kind == "adapter" else "transformers"
    licenses = {m.license for m in card.models}
    if card.models and len(licenses) == 1 and None not in licenses:
        meta.update(dict(next(iter(licenses))))
    meta["tags"] = list(TAGS)
    return meta


def _model_line(m: Any) -> str:
    if not m.hub_id:
        return f"- `{m.name}` (a local model)"
    url = f"{(m.endpoint or 'https://huggingface.co').rstrip('/')}/{m.hub_id}"
    line = f"- [{m.hub_id}]({url})"
    if m.revision:
        line += f" at revision `{m.revision}`"
    if m.commit and m.commit != m.revision:
        line += f" (commit `{m.commit}`)"
    return line


def card_text(card: Any, name: str, kind: str = "model") -> str:
    """README.md of an output folder: front matter, then what was merged and how."""
    meta = card_metadata(card, kind)
    method = f"[{card.method}]({card.paper})" if card.paper else f"`{card.method}`"
    what = "adapter" if kind == "adapter" else "model"
    body = [f"# {name}", "",
            f"This {what} is a merge of pre-trained language models made with mergekit-lite, using the "
            f"{method} merge method" + (f" with `{card.base}` as the base" if card.base else "") + "."]
    if card.description:
        body += ["", f"{card.method}: {card.description}"]
    body += ["", "## Models merged", ""] + [_model_line(m) for m in card.models]
    if card.dtype_note:
        body += ["", card.dtype_note]
    body += ["", "## Plan", "", "The plan that made it (also in `mergekit_config.yml`):", "",
             "```yaml", card.plan_text.rstrip(), "```", ""]
    return "---\n" + yaml.safe_dump(meta, sort_keys=False, allow_unicode=True) + "---\n\n" + "\n".join(body)


def write_card(folder: str, card: Any, name: str, kind: str = "model") -> None:
    """README.md with the card, and mergekit_config.yml with the plan (mergekit's name for it)."""
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as fh:
        fh.write(card_text(card, name, kind))
    plan = card.plan_text if card.plan_text.endswith("\n") else card.plan_text + "\n"
    if card.dtype_note:
        plan += f"# {card.dtype_note}\n"
    with open(os.path.join(folder, "mergekit_config.yml"), "w", encoding="utf-8") as fh:
        fh.write(plan)
