"""``torch``, imported on first use: what the method modules use instead of ``import torch``.

Why: the method registry (names, parameters, defaults, docs) is read by ``mergekit-lite methods``
and by ``--help``, which must answer without the seconds torch takes to import. The method
modules therefore register their contract at import time and reach torch through this proxy,
which imports it the first time a function body touches ``torch.<anything>``. Nothing in a
method module may use torch at import time (annotations are strings under
``from __future__ import annotations``); ``tests/test_cli_hygiene.py`` checks that importing the
registry leaves torch unimported.
"""

from __future__ import annotations

import importlib
from typing import Any


class _LazyModule:
    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        value = getattr(importlib.import_module(self._name), attr)
        setattr(self, attr, value)  # later lookups are plain attribute reads
        return value

    def __repr__(self) -> str:
        return f"<lazily imported module {self._name!r}>"


torch: Any = _LazyModule("torch")
