"""NearSwap: take the other model's value where it is close to the base's, keep the base's where
the two differ by much.

alchemonaut 2024, "QuartetAnemoi-70B" (NearSwap), https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001
"""

from __future__ import annotations

from ..lazy import torch

from . import Param, non_negative, register


@register(
    "nearswap",
    params=(Param("t", float, "global", check=non_negative,
                  doc="similarity threshold: entries closer than t take the other model's value"),),
    base="required",
    min_models=1,
    max_models=1,
    paper="https://huggingface.co/alchemonaut/QuartetAnemoi-70B-t0.0001",
    workspace=lambda n: 4.0,
)
def nearswap(tensors: list[torch.Tensor], base: torch.Tensor, *, t: float) -> torch.Tensor:
    """θ = w·θ₁ + (1 − w)·θ_base with w = clamp(t / max(|θ_base − θ₁|, 1e-6), 0, 1) per entry.

    Entries within t of each other become the other model's (w = 1); farther apart they lean back
    toward the base in proportion t/|Δ|. t = 0 returns the base.
    """
    base32 = base.to(torch.float32)
    w = (base32 - tensors[0]).abs_().clamp_(min=1e-6)
    w.reciprocal_().mul_(t).clamp_(0.0, 1.0)  # t/|Δ| as torch evaluates it (1/|Δ|·t), as mergekit
    out = tensors[0].to(torch.float32) * w
    return out.add_(w.neg_().add_(1.0).mul_(base32))  # + (1 − w)·θ_base, in w's buffer
