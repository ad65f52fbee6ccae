"""Linear merge (model soups).

Wortsman et al. 2022, "Model soups: averaging weights of multiple fine-tuned models improves
accuracy without increasing inference time", https://arxiv.org/abs/2203.05482
"""

from __future__ import annotations

import torch

from . import Param, register


def weighted_sum(tensors: list[torch.Tensor], weights: list[float]) -> torch.Tensor:
    """Σ_i w_i·θ_i in float32, accumulating one input at a time (one float32 buffer in all)."""
    acc = tensors[0].to(torch.float32) * weights[0]
    for tensor, w in zip(tensors[1:], weights[1:]):
        acc.add_(tensor, alpha=w)  # mixed-dtype add upcasts element-wise, without a float32 copy
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
    workspace=lambda n: 1.0,
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


linear.check_params = _check  # type: ignore[attr-defined]
