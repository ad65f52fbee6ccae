"""NuSLERP: spherical interpolation between two models with the position given by their weights,
over whole tensors, rows or columns, optionally in task-vector space.

Spherical interpolation: Shoemake 1985, https://dl.acm.org/doi/10.1145/325165.325242; the method
and its name are mergekit's (https://github.com/arcee-ai/mergekit, docs/merge_methods.md).
"""

from __future__ import annotations

from ..lazy import torch

from . import Param, register
from .spherical import combine, dots, scratch_bytes

NORM_EPS = 1e-7  # a vector norm below this counts as this (mergekit's value)
COLINEAR_EPS = 1e-8  # 1 − cos² ≤ COLINEAR_EPS² : colinear, interpolate linearly (mergekit's value)


def _coefficients(t: float, aa: torch.Tensor, bb: torch.Tensor, ab: torch.Tensor):
    """Per-vector (c0, c1), float64, from the per-vector dot products."""
    na = aa.sqrt().clamp(min=NORM_EPS)
    nb = bb.sqrt().clamp(min=NORM_EPS)
    cos = (ab / (na * nb)).clamp(-1.0, 1.0)
    colinear = (1.0 - cos * cos) <= COLINEAR_EPS ** 2
    theta = torch.acos(torch.where(colinear, torch.zeros_like(cos), cos))
    s = torch.sin(theta)
    c0 = torch.where(colinear, torch.full_like(cos, 1.0 - t), torch.sin((1.0 - t) * theta) / s)
    c1 = torch.where(colinear, torch.full_like(cos, t), torch.sin(t * theta) / s)
    return c0, c1


def interpolate(t: float, a: torch.Tensor, b: torch.Tensor, *, flatten: bool, dim: int) -> torch.Tensor:
    """Spherical interpolation of `a` toward `b` by `t`, each vector separately: the whole tensor
    (``flatten``), else the vectors along `dim`. Result in float32; inputs untouched."""
    if flatten or a.dim() < 2:
        aa, bb, ab = (torch.tensor(v, dtype=torch.float64) for v in dots(a, b))
        c0, c1 = _coefficients(t, aa, bb, ab)
        return combine(a, float(c0), b, float(c1))
    a32, b32 = a.to(torch.float32), b.to(torch.float32)
    aa = torch.linalg.vector_norm(a32, dim=dim, keepdim=True).double().square()
    bb = torch.linalg.vector_norm(b32, dim=dim, keepdim=True).double().square()
    ab = torch.linalg.vecdot(a32, b32, dim=dim).unsqueeze(dim).double()
    c0, c1 = _coefficients(t, aa, bb, ab)
    out = a32 * c0.to(torch.float32)
    return out.addcmul_(b32, c1.to(torch.float32))


def _check(params: dict) -> str | None:
    if abs(sum(params["weight"])) < 1e-12:
        return "the two models' weights sum to 0, so nuslerp's t = w₂/(w₁ + w₂) is undefined; change the weights"
    return None


@register(
    "nuslerp",
    params=(
        Param("weight", float, "model", doc="the model's share: t = w₂/(w₁ + w₂)"),
        Param("nuslerp_flatten", bool, "global", default=True,
              doc="interpolate whole tensors as one vector (false: per vector along the last dimension)"),
        Param("nuslerp_row_wise", bool, "global", default=False,
              doc="with nuslerp_flatten false: vectors along dimension 0 instead of the last"),
    ),
    base="optional",
    min_models=2,
    max_models=2,
    paper="https://github.com/arcee-ai/mergekit/blob/main/docs/merge_methods.md",
    checks=_check,
    workspace=lambda n: 5.0,
    scratch=scratch_bytes,
)
def nuslerp(tensors: list[torch.Tensor], base: torch.Tensor | None, *, weight: list[float],
            nuslerp_flatten: bool = True, nuslerp_row_wise: bool = False) -> torch.Tensor:
    """SLERP between two models at t = w₂/(w₁ + w₂) (weights summing to 0 are refused).

    Per vector v0, v1: cos Ω = v0·v1/(‖v0‖‖v1‖) (norms below 1e-7 count as 1e-7);
    slerp = sin((1−t)Ω)/sin Ω·v0 + sin(tΩ)/sin Ω·v1, or (1−t)·v0 + t·v1 where 1 − cos²Ω ≤ 1e-16.
    Vectors are the whole tensor (``nuslerp_flatten: true``, default), else the rows along the last
    dimension, or along dimension 0 with ``nuslerp_row_wise: true`` (mergekit's naming: a 2-D
    weight's columns). With a base model the interpolation runs between task vectors:
    θ = θ_base + slerp(t; θ₁ − θ_base, θ₂ − θ_base).
    """
    t = weight[1] / (weight[0] + weight[1])
    dim = 0 if nuslerp_row_wise else -1
    if base is None:
        return interpolate(t, tensors[0], tensors[1], flatten=nuslerp_flatten, dim=dim)
    base32 = base.to(torch.float32)
    a = tensors[0].to(torch.float32) - base32
    b = tensors[1].to(torch.float32) - base32
    out = interpolate(t, a, b, flatten=nuslerp_flatten, dim=dim)
    del a, b
    return out.add_(base32)


