"""The compute device: choosing it, and on CUDA keeping it busy.

On a GPU the merge itself is cheap; what costs is moving bytes. So, with ``--device cuda``:

- reads land in page-locked (pinned) host buffers (the buffer pool, :mod:`.buffers`), which the
  GPU copies from asynchronously;
- as soon as a read completes, its host-to-device copy is queued on a side stream (the copy
  stream), so block i+1 travels to the GPU while block i is merged on the compute stream; a merge
  waits only for its own inputs' copy events;
- a result is copied back into a pinned host buffer asynchronously; the writer waits for that copy's
  event before touching the bytes;
- the device has a budget of its own (``--max-device-memory``, default 90% of the memory free when
  the run starts), separate from the host budget: a group is admitted only when both have room,
  and returns its device reservation once merged (its results are on the host by then).

On the CPU nothing here is used: values stay where they are.
"""

from __future__ import annotations

from typing import Any

import torch

from .errors import BudgetExceeded, MergeError
from .io.sizes import human_size
from .ledger import Budget


def pick_device(name: str | None) -> torch.device:
    """'auto' (cuda when available), 'cpu', 'cuda' or 'cuda:N'."""
    name = (name or "auto").lower()
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MergeError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}); "
                         "use --device cpu or auto")
    try:
        return torch.device(name)
    except RuntimeError:
        raise MergeError(f"--device {name}: expected auto, cpu, cuda or cuda:N") from None


def device_budget(device: torch.device, limit: int | None) -> int:
    """The device memory budget: `limit`, or 90% of what is free now."""
    if limit is not None:
        return limit
    free, _ = torch.cuda.mem_get_info(device)
    return int(free * 0.9)


class DeviceLink:
    """Host <-> device traffic of one run on a CUDA device: uploads on a side stream, downloads into
    pinned buffers, events that order them with the compute stream."""

    def __init__(self, device: torch.device, limit: int | None, largest_need: int):
        self.device = device
        self.copy_stream = torch.cuda.Stream(device)
        self.budget = Budget(device_budget(device, limit))
        if largest_need > self.budget.limit:
            raise BudgetExceeded(f"the device memory budget {human_size(self.budget.limit)} is too small: one "
                                 f"row block needs {human_size(largest_need)}; pass a smaller --block-size or a "
                                 "larger --max-device-memory")
        torch.cuda.reset_peak_memory_stats(device)

    def upload(self, host: torch.Tensor) -> tuple[torch.Tensor, Any]:
        """Start copying `host` (pinned) to the device on the copy stream; (device tensor, event)."""
        with torch.cuda.stream(self.copy_stream):
            dev = host.to(self.device, non_blocking=True)
            event = torch.cuda.Event()
            event.record(self.copy_stream)
        dev.record_stream(torch.cuda.current_stream(self.device))  # freed only after compute used it
        return dev, event

    def use(self, dev: torch.Tensor, event: Any) -> torch.Tensor:
        """`dev` once its upload is done, as seen from the compute stream (no host wait)."""
        torch.cuda.current_stream(self.device).wait_event(event)
        return dev

    def download(self, dev: torch.Tensor, host: torch.Tensor) -> Any:
        """Start copying `dev` into the pinned `host` buffer; the event to wait for before reading it."""
        host.copy_(dev, non_blocking=True)
        event = torch.cuda.Event()
        event.record(torch.cuda.current_stream(self.device))
        return event

    @property
    def peak(self) -> int:
        return torch.cuda.max_memory_allocated(self.device)
