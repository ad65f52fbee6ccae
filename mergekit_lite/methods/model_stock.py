"""Model Stock: interpolate between the average of the fine-tunes and the base by a ratio from
the angle between their task vectors.

Jang et al. 2024, "Model Stock: All we need is just a few fine-tuned models",
https://arxiv.org/abs/2403.19522
"""

from __future__ import annotations

from ..lazy import torch

from . import Param, register


@register(
    "model_stock",
    params=(Param("filter_wise", bool, "global", default=False,
                  doc="one ratio per row (vectors along the last dimension) instead of per tensor"),),
    base="required",
    min_models=2,
    paper="https://arxiv.org/abs/2403.19522",
    workspace=lambda n: 5.0,
)
def model_stock(tensors: list[torch.Tensor], base: torch.Tensor, *, filter_wise: bool = False) -> torch.Tensor:
    """θ = t·θ̄ + (1 − t)·θ_base with θ̄ = (1/N)Σ_i θ_i and t = N·cos Ω / (1 + (N − 1)·cos Ω).

    cos Ω is the mean over pairs i < j of τ_i·τ_j/(‖τ_i‖‖τ_j‖) (τ_i = θ_i − θ_base; the norm
    product is clamped to ≥ 1e-6, each cosine to [−1, 1]). ``filter_wise``: one cos Ω and t per
    vector along the last dimension (a row of a 2-D weight; a 1-D tensor is one vector), else one
    per tensor. Where 1 + (N − 1)·cos Ω is within 1e-6 of 0, t = 0 (the base). Needs a base and at
    least two models (mergekit's rules). Task vectors are re-formed pair by pair, never all held.
    """
    base32 = base.to(torch.float32)
    n = len(tensors)
    dims = -1 if filter_wise else tuple(range(base32.dim()))

    def tv(i: int) -> torch.Tensor:
        return tensors[i].to(torch.float32) - base32

    def norm(x: torch.Tensor) -> torch.Tensor:
        return torch.linalg.vector_norm(x, dim=dims).double()

    norms = [norm(tv(i)) for i in range(n)]
    cos_sum = None
    for i in range(n):
        ti = tv(i)
        for j in range(i + 1, n):
            tj = tv(j)
            prod = (ti * tj).sum(dim=dims).double()
            del tj
            c = (prod / (norms[i] * norms[j]).clamp(min=1e-6)).clamp(-1.0, 1.0)
            cos_sum = c if cos_sum is None else cos_sum + c
        del ti
    cos = cos_sum / (n * (n - 1) / 2)
    den = 1.0 + (n - 1) * cos
    singular = den.abs() < 1e-6
    t = torch.where(singular, torch.zeros_like(cos), n * cos / torch.where(singular, torch.ones_like(den), den))
    if filter_wise:
        t = t.unsqueeze(-1)
    t32 = t.to(torch.float32)
    avg = tensors[0].to(torch.float32, copy=True)
    for x in tensors[1:]:
        avg.add_(x)
    avg.div_(n)
    out = avg.mul_(t32)
    return out.add_(base32 * (1.0 - t).to(torch.float32))
