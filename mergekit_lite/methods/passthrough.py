"""Passthrough: copy one model's tensor, optionally scaled. The building block of frankenmerges
(layer stacking) and depthwise upscaling (Kim et al. 2023, "SOLAR 10.7B: Scaling Large Language
Models with Simple yet Effective Depth Up-Scaling", https://arxiv.org/abs/2312.15166)."""

from __future__ import annotations

from ..lazy import torch

from . import Param, register


@register(
    "passthrough",
    params=(Param("scale", float, "model", default=1.0,
                  doc="multiply the tensor, e.g. 0 for o_proj/down_proj of a repeated layer"),),
    base="none",
    min_models=1,
    max_models=1,
    paper="https://arxiv.org/abs/2312.15166",
    workspace=lambda n: 1.0,
)
def passthrough(tensors: list[torch.Tensor], base: torch.Tensor | None, *, scale: list[float]) -> torch.Tensor:
    """θ = s·θ₁ for the single input (``scale`` s, default 1: the tensor itself, bit for bit)."""
    if scale[0] == 1.0:
        return tensors[0]
    return tensors[0].to(torch.float32) * scale[0]
