"""Helpers shared by the spherical methods (slerp, nuslerp, multislerp, karcher): chunked dot
products accumulated in float64, so that the angle between two huge tensors is exact to float32
rounding whatever their size and storage dtype, without a float32 copy of either."""

from __future__ import annotations

from ..lazy import torch

CHUNK = 1 << 18  # float64 scratch stays small (a few MB) whatever the tensor size


def scratch_bytes(numel: int) -> int:
    """Peak float64 scratch of the dot products: two upcast chunks and their product."""
    return 3 * 8 * min(numel, CHUNK)


def acc_dtype(device: torch.device) -> torch.dtype:
    """float64 where the device has it (MPS does not)."""
    return torch.float32 if device.type == "mps" else torch.float64


def _dot(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    # an ATen reduction rather than torch.dot: BLAS dot products stall when called from a thread
    # while the executor's reader threads are busy (milliseconds per call on small tensors)
    return (x * y).sum()


def dots(a: torch.Tensor, b: torch.Tensor) -> tuple[float, float, float]:
    """(a·a, b·b, a·b) over all entries, accumulated in float64 chunk by chunk."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    dt = acc_dtype(a.device)
    aa = bb = ab = torch.zeros((), dtype=dt, device=a.device)
    for start in range(0, fa.numel(), CHUNK):
        x = fa[start:start + CHUNK].to(dt)
        y = fb[start:start + CHUNK].to(dt)
        aa = aa + _dot(x, x)
        bb = bb + _dot(y, y)
        ab = ab + _dot(x, y)
    return float(aa), float(bb), float(ab)


def sq_norm(a: torch.Tensor) -> float:
    """‖a‖², accumulated in float64 chunk by chunk."""
    fa = a.reshape(-1)
    dt = acc_dtype(a.device)
    total = torch.zeros((), dtype=dt, device=a.device)
    for start in range(0, fa.numel(), CHUNK):
        x = fa[start:start + CHUNK].to(dt)
        total = total + _dot(x, x)
    return float(total)


def dot(a: torch.Tensor, b: torch.Tensor) -> float:
    """a·b, accumulated in float64 chunk by chunk."""
    fa, fb = a.reshape(-1), b.reshape(-1)
    dt = acc_dtype(a.device)
    total = torch.zeros((), dtype=dt, device=a.device)
    for start in range(0, fa.numel(), CHUNK):
        total = total + _dot(fa[start:start + CHUNK].to(dt), fb[start:start + CHUNK].to(dt))
    return float(total)


def combine(a: torch.Tensor, ca: float, b: torch.Tensor, cb: float) -> torch.Tensor:
    """ca·a + cb·b in float32 (one float32 buffer; the inputs are not modified)."""
    out = a.to(torch.float32) * ca
    return out.add_(b, alpha=cb)  # a mixed-dtype add upcasts element-wise, without a float32 copy
