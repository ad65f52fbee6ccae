"""The non-tensor files of an output folder: config.json, tokenizer files, the model card."""

from __future__ import annotations

import json
import os
import shutil
from typing import Any, Iterable

import yaml

from .reader import check_inside
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


def tokenizer_bytes(src_folder: str | None) -> int:
    """Bytes of the tokenizer files :func:`copy_tokenizer` would copy."""
    if not src_folder:
        return 0
    files = [p for p in (os.path.join(src_folder, n) for n in TOKENIZER_FILES) if os.path.isfile(p)]
    for path in files:
        check_inside(path, src_folder)
    return sum(os.path.getsize(p) for p in files)


def copy_tokenizer(src_folder: str | None, folder: str) -> list[str]:
    """Copy the tokenizer files that exist in `src_folder`; returns their names."""
    copied = []
    if not src_folder:
        return copied
    for name in TOKENIZER_FILES:
        src = os.path.join(src_folder, name)
        if os.path.isfile(src):
            check_inside(src, src_folder)  # a link out of the model folder is never followed
            shutil.copyfile(src, os.path.join(folder, name))
            copied.append(name)
    return copied


def write_card(folder: str, *, plan_text: str, method: str, models: Iterable[str], base: str | None,
               paper: str = "") -> None:
    """README.md with Hub metadata (a merge of the models it lists) and the plan that made it,
    plus the plan itself as mergekit_config.yml (mergekit's name for it)."""
    hub_ids = [m for m in dict.fromkeys(models) if looks_like_repo_id(m.split("@")[0]) and not os.path.exists(m)]
    meta: dict[str, Any] = {}
    if hub_ids:
        meta["base_model"] = [m.split("@")[0] for m in hub_ids]
        meta["base_model_relation"] = "merge"
    meta["library_name"] = "transformers"
    meta["tags"] = ["merge", "mergekit", "mergekit-lite"]
    listing = "\n".join(f"- {m}" for m in dict.fromkeys(models))
    link = f"[{method}]({paper})" if paper else method
    body = (f"# Merged model\n\nThis model was merged with mergekit-lite using the "
            f"{link} merge method" + (f" with {base} as the base" if base else "") + ".\n\n"
            f"## Models merged\n\n{listing}\n\n## Plan\n\n```yaml\n{plan_text.rstrip()}\n```\n")
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as fh:
        fh.write("---\n" + yaml.safe_dump(meta, sort_keys=False) + "---\n\n" + body)
    with open(os.path.join(folder, "mergekit_config.yml"), "w", encoding="utf-8") as fh:
        fh.write(plan_text if plan_text.endswith("\n") else plan_text + "\n")
