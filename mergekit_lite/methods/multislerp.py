"""Multi-SLERP: barycentric interpolation of several models on the hypersphere.

Goddard 2025, "Multi-SLERP", https://goddard.blog/posts/multislerp-wow-what-a-cool-idea (the
tangent-space construction of Buss & Fillmore 2001, "Spherical averages and applications to
spherical splines and interpolation", https://doi.org/10.1145/502122.502124).
"""

from __future__ import annotations

import math

from ..lazy import torch

from . import Param, register
from .spherical import dot, scratch_bytes, sq_norm


def _check(params: dict) -> str | None:
    if params["normalize_weights"] and abs(sum(params["weight"])) < 1e-12:
        return ("the models' weights sum to 0, so they cannot be normalized; change the weights or set "
                "normalize_weights: false")
    return None


@register(
    "multislerp",
    params=(
        Param("weight", float, "model", doc="the model's barycentric weight"),
        Param("normalize_weights", bool, "global", default=True, doc="divide the weights by their sum"),
        Param("eps", float, "global", default=1e-8, check=lambda v: None if v > 0 else f"must be positive, got {v}",
              doc="guard added to norms"),
    ),
    base="optional",
    min_models=1,
    paper="https://goddard.blog/posts/multislerp-wow-what-a-cool-idea",
    checks=_check,
    workspace=lambda n: 5.0,  # the upcast base, one task vector (and its upcast), the mean, dot scratch
    scratch=scratch_bytes,
)
def multislerp(tensors: list[torch.Tensor], base: torch.Tensor | None, *, weight: list[float],
               normalize_weights: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Weighted spherical mean of the models (or of their task vectors when a base is given).

    With T_i = θ_i (− θ_base), weights w_i (divided by Σ w with ``normalize_weights``),
    u_i = T_i/(‖T_i‖ + ε): M = Σ w_i u_i, m = M/‖M‖; tangent vectors t_i = u_i − (u_i·m)·m;
    τ = Σ w_i t_i; r = m·cos‖τ‖' + τ·sin‖τ‖'/‖τ‖' with ‖τ‖' = ‖τ‖ + ε;
    θ = (Σ w_i ‖T_i‖)·r (+ θ_base). One model: that model. Analytically τ = 0 (the tangent vectors
    at the normalized Euclidean mean average to zero), so r is m up to rounding.

    ‖M‖ < ε (e.g. two opposite vectors with equal weights): two models fall back to
    Σ w_i T_i (+ θ_base); more is an error. Streams: two passes over the models, no per-model copy.
    """
    if len(tensors) == 1:
        return tensors[0]
    w = list(weight)
    if normalize_weights:
        total = sum(w)
        w = [x / total for x in w]
    base32 = base.to(torch.float32) if base is not None else None

    def vec(i: int) -> torch.Tensor:
        return tensors[i].to(torch.float32) - base32 if base32 is not None else tensors[i]

    norms = [math.sqrt(sq_norm(vec(i))) for i in range(len(tensors))]
    mean = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    for i in range(len(tensors)):
        mean.add_(vec(i), alpha=w[i] / (norms[i] + eps))
    mean_norm = math.sqrt(sq_norm(mean))
    if mean_norm < eps:
        if len(tensors) != 2:
            raise ValueError("the weighted mean of the models' directions is zero (opposite tensors whose weights "
                             "cancel); multislerp cannot pick a direction: change the weights")
        out = vec(0).to(torch.float32) * w[0]
        out.add_(vec(1), alpha=w[1])
        return out.add_(base32) if base32 is not None else out
    mean.div_(mean_norm)
    # τ = Σ w_i (u_i − (u_i·m)·m) = M − (Σ_i w_i u_i·m)·m = c·m, since M = ‖M‖·m
    c = mean_norm - sum(w[i] * dot(vec(i), mean) / (norms[i] + eps) for i in range(len(tensors)))
    tn = abs(c) + eps
    scale = sum(wi * ni for wi, ni in zip(w, norms))
    out = mean.mul_((math.cos(tn) + c * math.sin(tn) / tn) * scale)
    return out.add_(base32) if base32 is not None else out


