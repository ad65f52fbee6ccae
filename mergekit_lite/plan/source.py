"""YAML documents with the line of every key, so that plan errors can point at the file and line.

PyYAML's composer gives nodes with marks; we build plain Python values from them and remember, for
each key path (a tuple of keys and list indices), the line it starts on.

A plan is untrusted input (it may come from anywhere), so loading it is bounded: the text's size,
the nesting depth, the number of values once aliases are expanded, and the range of numbers are
limited, and a self-referencing alias is refused, each as a PlanError with the file and line rather
than a MemoryError or RecursionError minutes later. Only PyYAML's safe constructors run: no tag
ever builds a Python object.
"""

from __future__ import annotations

import math
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


# Limits that keep a hostile or broken plan from exhausting memory, the stack or time. Real plans
# are a few kilobytes, a few levels deep and hold hundreds of values.
MAX_PLAN_BYTES = 1_000_000
MAX_DEPTH = 48  # nested mappings and lists, aliases expanded
MAX_VALUES = 200_000  # values built from the YAML, aliases expanded (an alias "bomb" hits this)
MAX_INT = 2**63 - 1  # integers beyond a signed 64-bit range are refused, not carried around
_MERGE_TAG = "tag:yaml.org,2002:merge"
_COLLECTION_TAGS = ("tag:yaml.org,2002:map", "tag:yaml.org,2002:seq")


class _Fatal(Exception):
    """A limit was hit: building stops at once with this issue."""

    def __init__(self, issue: Issue):
        super().__init__(str(issue))
        self.issue = issue


class _Loader(yaml.SafeLoader):
    """SafeLoader (no tags that build objects) whose composer stops at MAX_DEPTH levels of nesting,
    before Python's recursion limit is reached."""

    depth = 0
    file = "<plan>"

    def compose_node(self, parent, index):  # noqa: ANN001 - PyYAML's signature
        self.depth += 1
        try:
            if self.depth > MAX_DEPTH:
                mark = self.peek_event().start_mark
                raise _Fatal(Issue(self.file, mark.line + 1, "", f"the plan is nested more than {MAX_DEPTH} "
                                   "levels deep"))
            return super().compose_node(parent, index)
        finally:
            self.depth -= 1


class _Builder:
    """Plain Python values from composed nodes, with the line of every key path. Aliases are
    expanded here (so they are counted against MAX_VALUES and MAX_DEPTH), an alias inside the
    node it names is refused, and merge keys (``<<: *defaults``) are applied without PyYAML's
    flattening, whose copies grow exponentially with nested merges."""

    def __init__(self, loader: yaml.SafeLoader, doc: Document, issues: list[Issue]):
        self.loader = loader
        self.doc = doc
        self.issues = issues
        self.count = 0
        self.active: set[int] = set()  # nodes being built (an alias to one of them is a cycle)

    def fatal(self, node: yaml.Node, path: Path, message: str) -> _Fatal:
        """Stop building. The line is the top-level key's (an expanded alias's own line would
        point at its anchor, not at where the expansion went wrong)."""
        line = self.doc.lines.get(path[:1]) if path else None
        return _Fatal(Issue(self.doc.file, line or node.start_mark.line + 1, format_path(path), message))

    def build(self, node: yaml.Node, path: Path, depth: int = 0) -> Any:
        self.count += 1
        if self.count > MAX_VALUES:
            raise self.fatal(node, path, f"the plan expands to more than {MAX_VALUES} values (YAML aliases "
                             "repeating large parts?)")
        if depth > MAX_DEPTH:
            raise self.fatal(node, path, f"the plan is nested more than {MAX_DEPTH} levels deep (aliases expanded)")
        if id(node) in self.active:
            raise self.fatal(node, path, "an alias refers to a mapping or list that contains it")
        self.doc.lines.setdefault(path, node.start_mark.line + 1)
        if isinstance(node, yaml.ScalarNode):
            return self.scalar(node, path)
        if node.tag not in _COLLECTION_TAGS:
            raise self.fatal(node, path, f"the YAML tag {node.tag} is not allowed in a plan")
        self.active.add(id(node))
        try:
            if isinstance(node, yaml.MappingNode):
                return self.mapping(node, path, depth)
            return [self.build(child, path + (i,), depth + 1) for i, child in enumerate(node.value)]
        finally:
            self.active.discard(id(node))

    def mapping(self, node: yaml.MappingNode, path: Path, depth: int) -> dict[str, Any]:
        merged: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                sources = value_node.value if isinstance(value_node, yaml.SequenceNode) else [value_node]
                for src in sources:
                    if not isinstance(src, yaml.MappingNode):
                        raise self.fatal(src, path, "a merge key (<<) takes a mapping or a list of mappings")
                    for k, v in self.build(src, path, depth).items():
                        merged.setdefault(k, v)
        out: dict[str, Any] = {}
        for key_node, value_node in node.value:
            if key_node.tag == _MERGE_TAG:
                continue
            key = self.key(key_node, path)
            if key is None:
                continue
            kpath = path + (key,)
            if key in out:
                self.issues.append(Issue(self.doc.file, key_node.start_mark.line + 1, format_path(kpath),
                                         f"duplicate key '{key}' (first given on line {self.doc.lines.get(kpath)})"))
                continue
            self.doc.lines[kpath] = key_node.start_mark.line + 1
            out[key] = self.build(value_node, kpath, depth + 1)
        return {**merged, **out}

    def key(self, key_node: yaml.Node, path: Path) -> str | None:
        key = self.loader.construct_object(key_node, deep=True) if isinstance(key_node, yaml.ScalarNode) else None
        if not isinstance(key, (str, int, float, bool)) or key is None:
            shown = key if isinstance(key_node, yaml.ScalarNode) else "a mapping or list"
            self.issues.append(Issue(self.doc.file, key_node.start_mark.line + 1, format_path(path),
                                     f"a key must be a plain name, got {shown!r}"))
            return None
        return str(key) if not isinstance(key, str) else key

    def scalar(self, node: yaml.ScalarNode, path: Path) -> Any:
        value = self.loader.construct_object(node, deep=True)
        if isinstance(value, str) and node.style is None and _SCI_FLOAT.match(value):
            value = float(value)
        if isinstance(value, bool):
            return value
        if isinstance(value, int) and abs(value) > MAX_INT:
            self.issues.append(self.doc.issue(path, f"the number {node.value[:30]} is out of range (at most "
                                              f"{MAX_INT} in magnitude)"))
        elif isinstance(value, float) and not math.isfinite(value):
            self.issues.append(self.doc.issue(path, f"{node.value[:30]} is not a finite number"))
        return value


def _char(c: Any) -> str:
    return f"#x{c:04x}" if isinstance(c, int) else f"#x{ord(c):04x}" if isinstance(c, str) and len(c) == 1 else repr(c)


def load_documents(text: str, file: str = "<plan>") -> list[Document]:
    """Parse every YAML document of `text`. Malformed YAML, and plans past the limits above, raise
    PlanError with the line and the cause."""
    size = len(text.encode("utf-8", "surrogatepass"))
    if size > MAX_PLAN_BYTES:
        raise PlanError(Issue(file, None, "", f"the plan is {size} bytes; plans are limited to {MAX_PLAN_BYTES} bytes"))
    try:
        loader = _Loader(text)
    except yaml.reader.ReaderError as exc:
        line = text[:exc.position].count("\n") + 1
        raise PlanError(Issue(file, line, "", f"malformed YAML: character {_char(exc.character)} is not allowed "
                              "(control characters and lone surrogates cannot appear in a plan)")) from None
    loader.file = file
    docs: list[Document] = []
    issues: list[Issue] = []
    try:
        while loader.check_node():
            node = loader.get_node()
            doc = Document(data=None, file=file, text=text, index=len(docs))
            if node is not None:
                doc.data = _Builder(loader, doc, issues).build(node, ())
            docs.append(doc)
    except _Fatal as exc:
        raise PlanError(exc.issue) from None
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
