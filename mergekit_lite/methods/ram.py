"""RAM and RAM+ (tensor-local): average the task-vector entries several models changed, keep the
entries only one model changed whole (RAM+ also scales them up), ignore the ones nobody changed.

Designed for RL-trained agents, whose task vectors are sparse and rarely overlap, so that plain
averaging dilutes each model's unique updates. "Behavior Knowledge Merge in Reinforced Agentic
Models" (Reinforced Agent Merging), https://arxiv.org/abs/2601.13572; the reference
implementation is mergekit 0.1.5's ``merge_methods/ram.py``.
"""

from __future__ import annotations

from ..lazy import torch

from . import Param, non_negative, register
from .gta import task_vector_into

PAPER = "https://arxiv.org/abs/2601.13572"
EPSILON = Param("epsilon", float, "global", default=1e-5, check=non_negative,
                doc="a task-vector entry counts as changed when |τ| > epsilon")


def contributors(tensors: list[torch.Tensor], base32: torch.Tensor, buf: torch.Tensor,
                 epsilon: float) -> torch.Tensor:
    """c = Σᵢ [|τᵢ| > ε]: how many models changed each entry (float32)."""
    count = torch.zeros_like(base32)
    for t in tensors:
        count.add_(task_vector_into(buf, t, base32).abs_().gt(epsilon))
    return count


def _merge(tensors: list[torch.Tensor], base: torch.Tensor, epsilon: float, gain=None) -> torch.Tensor:
    """θ_base + Σᵢ τᵢ·[|τᵢ| > ε]·(λᵢ where c = 1, else 1/c), λᵢ = gain(changedᵢ, c = 1) or 1."""
    base32 = base.to(torch.float32)
    buf = torch.empty_like(base32)
    count = contributors(tensors, base32, buf, epsilon)
    unique = count.eq(1.0)
    divisor = count.clamp_(min=1.0)
    out = torch.zeros_like(base32)
    for t in tensors:
        tv = task_vector_into(buf, t, base32)
        changed = tv.abs() > epsilon
        tv.mul_(changed).div_(divisor)  # entries at or below ε are no change; shared ones averaged
        lam = gain(changed, unique) if gain is not None else 1.0
        del changed
        if lam != 1.0:
            tv.mul_(torch.where(unique, lam, 1.0))
        out.add_(tv)
    return out.add_(base32)


@register("ram", params=(EPSILON,), base="required", min_models=1, paper=PAPER, workspace=lambda n: 6.0)
def ram(tensors: list[torch.Tensor], base: torch.Tensor, *, epsilon: float = 1e-5) -> torch.Tensor:
    """θ = θ_base + Σᵢ τᵢ·[|τᵢ| > ε] / max(c, 1), c = Σᵢ [|τᵢ| > ε].

    An entry changed by one model (c = 1) takes that model's change whole; an entry changed by
    several is their mean; an entry no model changed by more than ε keeps the base's value.
    """
    return _merge(tensors, base, epsilon)


def _unique_gain(r: float, alpha: float, epsilon: float):
    """λᵢ = 1 + r·clamp(ρᵢ, 0, α), ρᵢ = #(changed by i and others) / max(#(changed by i alone), ε)."""
    def gain(changed: torch.Tensor, unique: torch.Tensor) -> float:
        alone = torch.count_nonzero(changed & unique)
        shared = torch.count_nonzero(changed) - alone
        rho = shared.to(torch.float32) / alone.to(torch.float32).clamp(min=epsilon)
        return float(1 + r * rho.clamp(min=0, max=alpha))  # in float32, as mergekit computes it

    return gain


@register(
    "ramplus_tl",
    params=(Param("r", float, "global", default=0.1, check=non_negative,
                  doc="how strongly a model's unique entries are scaled up with its overlap ratio"),
            Param("alpha", float, "global", default=0.2, check=non_negative,
                  doc="cap on the overlap ratio rho"),
            EPSILON),
    base="required",
    min_models=1,
    paper=PAPER,
    workspace=lambda n: 6.0,
)
def ramplus_tl(tensors: list[torch.Tensor], base: torch.Tensor, *, r: float = 0.1, alpha: float = 0.2,
               epsilon: float = 1e-5) -> torch.Tensor:
    """RAM with each model's unique entries scaled by λᵢ = 1 + r·clamp(ρᵢ, 0, α) (tensor-local).

    ρᵢ = (entries model i changed that others changed too) / max(entries only model i changed, ε),
    counted within this tensor: a model whose changes are mostly shared has its few unique
    changes boosted, by at most r·α (2% at the defaults), to make up for the dilution averaging
    causes. Shared entries are averaged and unchanged ones keep the base's value, as in RAM.
    """
    return _merge(tensors, base, epsilon, _unique_gain(r, alpha, epsilon))
