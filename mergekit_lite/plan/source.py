"""YAML documents with the line of every key, so that plan errors can point at the file and line.

PyYAML's composer gives nodes with marks; we build plain Python values from them and remember, for
each key path (a tuple of keys and list indices), the line it starts on.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any

import yaml

from ..errors import Issue, PlanError

Path = tuple  # of str | int

# YAML 1.1 (PyYAML) reads ``1e-5`` as a string; mergekit's pydantic schema turns it into a number.
# Plain (unquoted) scalars of that shape are therefore read as floats here too.
_SCI_FLOAT = re.compile(r"^[-+]?(\d+\.?\d*|\.\d+)[eE][-+]?\d+$")


def format_path(path: Path) -> str:
    """('models', 1, 'parameters', 'weight') -> 'models[1].parameters.weight'."""
    out = ""
    for p in path:
        if isinstance(p, int):
            out += f"[{p}]"
        else:
            out += ("." if out else "") + str(p)
    return out


@dataclass
class Document:
    """One YAML document of a plan file: its data and where each key path starts."""

    data: Any
    file: str
    text: str
    lines: dict[Path, int] = field(default_factory=dict)  # path -> 1-based line
    index: int = 0  # position in a multi-document file

    def line(self, path: Path) -> int | None:
        """Line of `path`, or of its nearest ancestor that has one."""
        path = tuple(path)
        while path:
            if path in self.lines:
                return self.lines[path]
            path = path[:-1]
        return self.lines.get((), None)

    def issue(self, path: Path, message: str) -> Issue:
        return Issue(self.file, self.line(path), format_path(tuple(path)), message)


class _Builder:
    def __init__(self, loader: yaml.SafeLoader, doc: Document, issues: list[Issue]):
        self.loader = loader
        self.doc = doc
        self.issues = issues

    def build(self, node: yaml.Node, path: Path) -> Any:
        self.doc.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.MappingNode):
            out: dict[Any, Any] = {}
            self.loader.flatten_mapping(node)
            for key_node, value_node in node.value:
                key = self.loader.construct_object(key_node, deep=True)
                if not isinstance(key, (str, int, float, bool)) or key is None:
                    self.issues.append(Issue(self.doc.file, key_node.start_mark.line + 1,
                                             format_path(path), f"a key must be a plain name, got {key!r}"))
                    continue
                key = str(key) if not isinstance(key, str) else key
                kpath = path + (key,)
                if key in out:
                    self.issues.append(Issue(self.doc.file, key_node.start_mark.line + 1, format_path(kpath),
                                             f"duplicate key '{key}' (first given on line {self.doc.lines.get(kpath)})"))
                    continue
                self.doc.lines[kpath] = key_node.start_mark.line + 1
                out[key] = self.build(value_node, kpath)
            return out
        if isinstance(node, yaml.SequenceNode):
            return [self.build(child, path + (i,)) for i, child in enumerate(node.value)]
        value = self.loader.construct_object(node, deep=True)
        if isinstance(value, str) and node.style is None and _SCI_FLOAT.match(value):
            return float(value)
        return value


def load_documents(text: str, file: str = "<plan>") -> list[Document]:
    """Parse every YAML document of `text`. Malformed YAML raises PlanError with the line and the cause."""
    loader = yaml.SafeLoader(text)
    docs: list[Document] = []
    issues: list[Issue] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            doc = Document(data=None, file=file, text=text, index=len(docs))
            if node is not None:
                doc.data = _Builder(loader, doc, issues).build(node, ())
            docs.append(doc)
    except yaml.MarkedYAMLError as exc:
        mark = exc.problem_mark or exc.context_mark
        line = mark.line + 1 if mark is not None else None
        problem = " ".join(p for p in (exc.context, exc.problem) if p)
        raise PlanError(Issue(file, line, "", f"malformed YAML: {problem}")) from None
    except yaml.YAMLError as exc:  # pragma: no cover - non-marked errors are rare
        raise PlanError(Issue(file, None, "", f"malformed YAML: {exc}")) from None
    finally:
        loader.dispose()
    if issues:
        raise PlanError(issues)
    docs = [d for d in docs if d.data is not None]
    if not docs:
        raise PlanError(Issue(file, None, "", "the plan is empty: expected a mapping with at least 'merge_method'"))
    return docs
