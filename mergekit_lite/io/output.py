"""The non-tensor files of an output folder that come from a donor: config.json, generation_config.json,
and the custom code an ``auto_map`` names.

A model whose config.json has ``auto_map`` (``{"AutoModelForCausalLM": "modeling_x.XForCausalLM"}``)
is loaded by transformers from ``modeling_x.py`` next to it (with ``trust_remote_code``); keeping
the ``auto_map`` without the file gives a folder nothing can load. So the files it names, and the
files they import relatively (``from .configuration_x import ...``), are copied from the folder the
config came from; ``tokenizer_config.json``'s ``auto_map`` likewise from the tokenizer's folder.
References to code in another repo (``org/repo--module.Class``) are left as they are. Only plain
module names are followed, and only to files inside the donor folder (or, for a Hub download, its
cache entry): never a path out of a model folder. The code is copied, never run.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from typing import Any, Iterable

from .reader import check_inside

_MODULE = re.compile(r"^[A-Za-z_]\w*$")
_RELATIVE_IMPORT = re.compile(r"^\s*from\s+\.([A-Za-z_]\w*)?\s+import\s+(.+)$", re.MULTILINE)


def write_config(folder: str, config: dict[str, Any]) -> None:
    if not config:
        return
    with open(os.path.join(folder, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2, sort_keys=False)
        fh.write("\n")


def copy_generation_config(src_folder: str | None, folder: str) -> bool:
    src = os.path.join(src_folder, "generation_config.json") if src_folder else ""
    if src and os.path.isfile(src):
        check_inside(src, src_folder)  # a link out of the model folder is never followed
        shutil.copyfile(src, os.path.join(folder, "generation_config.json"))
        return True
    return False


def auto_map_modules(auto_map: Any) -> list[str]:
    """Module names an ``auto_map`` refers to in the same repo ('modeling_x' for 'modeling_x.XModel')."""
    values: Iterable[Any] = auto_map.values() if isinstance(auto_map, dict) else (
        [auto_map] if isinstance(auto_map, (list, tuple)) else [])
    out = []
    for v in values:
        for ref in (v if isinstance(v, (list, tuple)) else [v]):
            if isinstance(ref, str) and "--" not in ref and "." in ref:
                module = ref.rsplit(".", 1)[0]
                if _MODULE.match(module):
                    out.append(module)
    return list(dict.fromkeys(out))


def copy_custom_code(src_folder: str | None, folder: str, auto_map: Any) -> list[str]:
    """Copy the modules `auto_map` names, and those they import relatively; returns the files copied."""
    if not src_folder:
        return []
    todo, done = auto_map_modules(auto_map), []
    while todo:
        module = todo.pop(0)
        name = module + ".py"
        if name in done:
            continue
        src = os.path.join(src_folder, name)
        if not (os.path.isfile(src) and _inside(src_folder, src)):
            continue
        shutil.copyfile(src, os.path.join(folder, name))
        done.append(name)
        with open(src, encoding="utf-8", errors="replace") as fh:
            todo += _relative_imports(fh.read())
    return done


def _relative_imports(code: str) -> list[str]:
    """Modules a file imports from its own package: ``from .x import y`` -> x; ``from . import x, y``."""
    out = []
    for module, names in _RELATIVE_IMPORT.findall(code):
        if module:
            out.append(module)
        else:
            names = [n.strip().split(" ")[0] for n in names.strip("()").split(",")]  # "x as y" imports x
            out += [n for n in names if _MODULE.match(n)]
    return out


def _inside(folder: str, path: str) -> bool:
    """`path` resolves inside `folder`, or inside the Hub cache entry a snapshot folder belongs to
    (a snapshot's files are links to ``../../blobs/``)."""
    real = os.path.realpath(path)
    roots = [os.path.realpath(folder)]
    parent = os.path.dirname(os.path.abspath(folder))
    if os.path.basename(parent) == "snapshots":
        roots.append(os.path.join(os.path.realpath(os.path.dirname(parent)), "blobs"))
    return any(os.path.commonpath([real, root]) == root for root in roots)
