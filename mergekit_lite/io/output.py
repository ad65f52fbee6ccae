"""The non-tensor files of an output folder: config.json, tokenizer files, the model card."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterable

import yaml

from .resolve import looks_like_repo_id

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
    "generation_config.json",
)


def write_config(folder: str, config: dict[str, Any]) -> None:
    if not config:
        return
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2, sort_keys=False)
        fh.write("\n")


def copy_tokenizer(src_folder: str | None, folder: str) -> list[str]:
    """Copy the tokenizer files that exist in `src_folder`; returns their names."""
    copied = []
    if not src_folder:
        return copied
    for name in TOKENIZER_FILES:
        src = os.path.join(src_folder, name)
        if os.path.isfile(src):
            shutil.copyfile(src, os.path.join(folder, name))
            copied.append(name)
    return copied


def write_card(folder: str, *, plan_text: str, method: str, models: Iterable[str], base: str | None,
               paper: str = "", library: str = "transformers") -> None:
    """README.md with Hub metadata (a merge of the models it lists) and the plan that made it,
    plus the plan itself as mergekit_config.yml (mergekit's name for it). `library` is the card's
    library_name: ``peft`` for adapter folders."""
    hub_ids = [m for m in dict.fromkeys(models) if looks_like_repo_id(m.split("@")[0]) and not os.path.exists(m)]
    meta: dict[str, Any] = {}
    if hub_ids:
        meta["base_model"] = [m.split("@")[0] for m in hub_ids]
        meta["base_model_relation"] = "merge"
    meta["library_name"] = library
    meta["tags"] = ["merge", "mergekit", "mergekit-lite"]
    listing = "\n".join(f"- {m}" for m in dict.fromkeys(models))
    link = f"[{method}]({paper})" if paper else method
    what = "adapter" if library == "peft" else "model"
    body = (f"# Merged {what}\n\nThis {what} was merged with mergekit-lite using the "
            f"{link} merge method" + (f" with {base} as the base" if base else "") + ".\n\n"
            f"## Models merged\n\n{listing}\n\n## Plan\n\n```yaml\n{plan_text.rstrip()}\n```\n")
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as fh:
        fh.write("---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + body)
    with open(os.path.join(folder, "mergekit_config.yml"), "w", encoding="utf-8") as fh:
        fh.write(plan_text if plan_text.endswith("\n") else plan_text + "\n")
