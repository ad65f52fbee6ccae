"""Measuring the tensor memory a piece of code allocates, to check the memory ledger's declarations.

:class:`AllocationProbe` is a ``TorchDispatchMode``: every tensor an operation returns is seen,
and the bytes of storages that did not exist before (and are not one of the given inputs) are
counted while some tensor still refers to them. ``peak`` is then the most new bytes alive at any
moment of the code run under it: a method's float32 temporaries, its result and any rounded copy.
The executor runs merges under a probe when asked to measure (``Executor(measure=True)``), and
the tests compare what it sees with what nodes declare. It is slow (a Python call per operation),
so it is never used for ordinary runs.

Storages under :data:`MIN_TRACKED` bytes are not counted: 0-d tensors and per-row statistics of
tiny tensors, below the granularity the budget plans in (a tensor-sized buffer of a real model
is megabytes). A method that under-declares any buffer of its tensors' size is still caught.
"""

from __future__ import annotations

import weakref
from typing import Any, Iterable

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


MIN_TRACKED = 1024


class AllocationProbe(TorchDispatchMode):
    """Peak bytes of new tensor storages alive while the mode is active."""

    def __init__(self, existing: Iterable[torch.Tensor] = ()):
        super().__init__()
        self.known = {_key(t) for t in existing if isinstance(t, torch.Tensor)}
        self.refs: dict[int, int] = {}  # storage -> live tensors seen referring to it
        self.sizes: dict[int, int] = {}
        self.live = 0
        self.peak = 0

    def __torch_dispatch__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.device.type == "cpu":
                self._track(t)
        return out

    def _track(self, t: torch.Tensor) -> None:
        key = _key(t)
        if key in self.known or key == 0:
            return
        size = t.untyped_storage().nbytes()
        if size < MIN_TRACKED and key not in self.refs:
            return
        if key not in self.refs:
            self.refs[key] = 0
            self.sizes[key] = size
            self.live += size
        elif size > self.sizes[key]:  # resized in place (an out= argument)
            self.live += size - self.sizes[key]
            self.sizes[key] = size
        self.refs[key] += 1
        self.peak = max(self.peak, self.live)
        weakref.finalize(t, self._release, key)

    def _release(self, key: int) -> None:
        self.refs[key] -= 1
        if self.refs[key] == 0:
            self.live -= self.sizes.pop(key)
            del self.refs[key]


def _key(t: torch.Tensor) -> int:
    return t.untyped_storage().data_ptr()
