"""Karcher mean: the weighted Riemannian (Fréchet) mean of the models' directions on the unit
sphere, scaled by their weighted mean norm.

Karcher 1977, "Riemannian center of mass and mollifier smoothing", Comm. Pure Appl. Math. 30(5),
https://doi.org/10.1002/cpa.3160300502; as a merge method, mergekit's ``karcher``
(https://arxiv.org/abs/2603.04972).
"""

from __future__ import annotations

import math

from ..lazy import torch

from . import Param, positive, register
from .spherical import dot, scratch_bytes, sq_norm


def _check(params: dict) -> str | None:
    w = params["weight"]
    if any(x < 0 for x in w):
        return f"karcher weights are masses on the sphere and must be zero or positive, got {list(w)}"
    if sum(w) <= 0:
        return "the models' weights sum to 0; give at least one model a positive weight"
    return None


MAX_ITER = 10_000  # far past convergence (a few steps); a larger count only makes a run never end


@register(
    "karcher",
    params=(
        Param("weight", float, "model", default=1.0, doc="the model's mass in the mean (mergekit ignores weights)"),
        Param("max_iter", int, "global", default=10,
              check=lambda v: None if 1 <= v <= MAX_ITER else f"must be between 1 and {MAX_ITER}, got {v}",
              doc="most gradient steps"),
        Param("tol", float, "global", default=1e-5, check=positive, doc="stop when the step is shorter than this"),
    ),
    base="none",
    min_models=1,
    paper="https://arxiv.org/abs/2603.04972",
    checks=_check,
    workspace=lambda n: 4.0,  # the mean, the tangent, an upcast input, dot scratch
    scratch=scratch_bytes,
)
def karcher(tensors: list[torch.Tensor], base: torch.Tensor | None, *, weight: list[float], max_iter: int = 10,
            tol: float = 1e-5) -> torch.Tensor:
    """Weighted Karcher mean on the unit sphere, by Riemannian gradient descent.

    α_i = w_i/Σ w; u_i = θ_i/‖θ_i‖ (tensors with ‖θ_i‖ ≤ tol take no part in the direction).
    Start at m = normalize(Σ α_i u_i) (u of the first model if that is shorter than tol); repeat up
    to ``max_iter`` times: Ω_i = arccos(m·u_i), T = Σ α_i·Ω_i/sin Ω_i·(u_i − (m·u_i)·m) over the
    models with tol ≤ Ω_i ≤ π − tol (an antipodal point gives no direction), stop when ‖T‖ < tol,
    else m ← normalize(cos‖T‖·m + sin‖T‖·T/‖T‖). Result: (Σ_i α_i‖θ_i‖)·m.

    Differences from mergekit 0.1.5: per-model ``weight`` is honoured (mergekit ignores it and
    uses α_i = 1/N; equal weights, the default, reproduce mergekit); antipodal points are skipped
    instead of producing a huge step. With ``base_model`` not listed under models, the base is
    merged as one more model (weight 1), as mergekit does.
    """
    if len(tensors) == 1:
        return tensors[0]
    total = sum(weight)
    alpha = [w / total for w in weight]
    norms = [math.sqrt(sq_norm(t)) for t in tensors]
    valid = [i for i, n in enumerate(norms) if n > tol]
    if not valid:
        return torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    a_sum = sum(alpha[i] for i in valid)
    a = {i: alpha[i] / a_sum for i in valid}

    mean = torch.zeros(tensors[0].shape, dtype=torch.float32, device=tensors[0].device)
    for i in valid:
        mean.add_(tensors[i], alpha=a[i] / norms[i])
    mn = math.sqrt(sq_norm(mean))
    if mn < tol:
        mean.zero_().add_(tensors[valid[0]], alpha=1.0 / norms[valid[0]])
    else:
        mean.div_(mn)

    tangent = torch.empty_like(mean)
    for _ in range(max_iter):
        tangent.zero_()
        along_mean = 0.0
        for i in valid:
            c = max(-1.0, min(1.0, dot(mean, tensors[i]) / norms[i]))
            omega = math.acos(c)
            if omega < tol or math.pi - omega < tol:
                continue
            k = a[i] * omega / math.sin(omega)
            tangent.add_(tensors[i], alpha=k / norms[i])  # Σ k_i u_i ...
            along_mean += k * c  # ... − (Σ k_i (m·u_i)) m
        if along_mean:
            tangent.add_(mean, alpha=-along_mean)
        tn = math.sqrt(sq_norm(tangent))
        if tn < tol:
            break
        mean.mul_(math.cos(tn)).add_(tangent, alpha=math.sin(tn) / tn)
        un = math.sqrt(sq_norm(mean))
        if un > tol:
            mean.div_(un)
    return mean.mul_(sum(alpha[i] * norms[i] for i in range(len(tensors))))


