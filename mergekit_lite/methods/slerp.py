"""Spherical linear interpolation between the base model and one other model.

Shoemake 1985, "Animating rotation with quaternion curves", SIGGRAPH '85,
https://dl.acm.org/doi/10.1145/325165.325242 (and https://en.wikipedia.org/wiki/Slerp)
"""

from __future__ import annotations

import math

from ..lazy import torch

from . import Param, register
from .spherical import combine, dots, scratch_bytes

DOT_THRESHOLD = 0.9995  # |cos θ| above this: (anti)colinear, interpolate linearly (mergekit's value)
EPS = 1e-8


def slerp_coefficients(t: float, aa: float, bb: float, ab: float) -> tuple[float, float]:
    """(c0, c1) with slerp(t; v0, v1) = c0·v0 + c1·v1, from v0·v0, v1·v1 and v0·v1."""
    n0 = math.sqrt(aa)
    n1 = math.sqrt(bb)
    n0 = n0 if n0 > EPS else 1.0
    n1 = n1 if n1 > EPS else 1.0
    cos = max(-1.0, min(1.0, ab / (n0 * n1)))
    if abs(cos) > DOT_THRESHOLD:
        return 1.0 - t, t
    theta = math.acos(cos)
    s = math.sin(theta)
    return math.sin((1.0 - t) * theta) / s, math.sin(t * theta) / s


@register(
    "slerp",
    params=(Param("t", float, "global", doc="interpolation position: 0 is the base model, 1 the other model"),),
    base="required",
    min_models=1,
    max_models=1,
    paper="https://en.wikipedia.org/wiki/Slerp",
    workspace=lambda n: 2.0,
    scratch=scratch_bytes,
)
def slerp(tensors: list[torch.Tensor], base: torch.Tensor, *, t: float) -> torch.Tensor:
    """SLERP from the base (t = 0) to the other model (t = 1), one angle per tensor.

    With v0 = θ_base, v1 = θ_other flattened, cos Ω = v0·v1 / (‖v0‖‖v1‖):
    θ = sin((1−t)Ω)/sin Ω · v0 + sin(tΩ)/sin Ω · v1.
    When |cos Ω| > 0.9995 (identical, opposite or nearly colinear tensors, and one-element
    tensors) it falls back to θ = (1−t)·v0 + t·v1. A norm below 1e-8 counts as 1 (a zero tensor is
    orthogonal to everything). t = 0 and t = 1 return the endpoints exactly.

    The dot products are accumulated in float64 on the tensors' device, chunk by chunk; the
    result is formed in float32 (mergekit computes in numpy on the CPU before 0.1.5).
    """
    v0, v1 = base, tensors[0]
    c0, c1 = slerp_coefficients(t, *dots(v0, v1))
    return combine(v0, c0, v1, c1)
