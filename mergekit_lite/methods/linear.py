"""Linear merge (model soups).

Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time", https://arxiv.org/abs/2203.05482
"""

from __future__ import annotations

from ..lazy import torch

from . import Param, register


def as_float32(tensor: torch.Tensor, buf: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """`tensor` in float32: itself when it already is, else converted into the reused buffer `buf`
    (allocated on first use). Converting into a buffer and then doing float32 arithmetic is several
    times faster on CPU than mixed-dtype arithmetic, and reuses memory already paged in."""
    if tensor.dtype == torch.float32:
        return tensor, buf
    if buf is None:
        buf = torch.empty(tensor.shape, dtype=torch.float32, device=tensor.device)
    buf.copy_(tensor)
    return buf, buf


def weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ_i w_i·θ_i in float32, accumulating one input at a time (an accumulator and one
    conversion buffer in all)."""
    acc = torch.empty(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    acc.copy_(tensors[0])
    acc.mul_(weights[0])
    buf = None
    for tensor, w in zip(tensors[1:], weights[1:]):
        value, buf = as_float32(tensor, buf)
        acc.add_(value, alpha=w)
    return acc


def _check(params: dict) -> str | None:
    if params["normalize"] and abs(sum(params["weight"])) < 1e-12:
        return ("the models' weights sum to 0, so the normalized average Σ w·θ / Σ w is undefined; "
                "change the weights or set normalize: false")
    return None


@register(
    "linear",
    params=(
        Param("weight", float, "model", doc="the model's coefficient"),
        Param("normalize", bool, "global", default=True, doc="divide by the sum of the weights"),
    ),
    base="none",
    paper="https://arxiv.org/abs/2203.05482",
    checks=_check,
    workspace=lambda n: 2.0,
)
def linear(tensors: list[torch.Tensor], base: torch.Tensor | None, *, weight: list[float],
           normalize: bool) -> torch.Tensor:
    """Weighted average of the models (a model soup).

    θ = Σ_i w_i·θ_i / Σ_i w_i   with ``normalize: true`` (default), else θ = Σ_i w_i·θ_i.

    Weights summing to zero with ``normalize: true`` are refused when the plan is compiled
    (mergekit returns inf/NaN there).
    """
    acc = weighted_sum(tensors, weight)
    if normalize:
        acc.div_(sum(weight))
    return acc


