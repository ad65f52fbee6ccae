"""SCE: select high-variance entries, calculate per-model weights from task-vector energy, erase
entries of minority sign, then merge.

Wan et al. 2024, "FuseChat: Knowledge Fusion of Chat Models" (SCE merging),
https://arxiv.org/abs/2408.07990
"""

from __future__ import annotations

from ..lazy import torch

from . import Param, register
from .gta import INT8_MASK, disjoint_merge, elect_sign, task_vector_into
from .sparsify import rank_window


def _topk_check(value: float) -> str | None:
    return None if 0.0 < value <= 1.0 else f"select_topk is the fraction of entries kept: it must be in (0, 1], got {value}"


@register(
    "sce",
    params=(Param("select_topk", float, "global", default=1.0, check=_topk_check,
                  doc="fraction of the entries, by variance across the models, that are merged"),
            INT8_MASK),
    base="required",
    min_models=1,
    paper="https://arxiv.org/abs/2408.07990",
    workspace=lambda n: 7.0,
)
def sce(tensors: list[torch.Tensor], base: torch.Tensor, *, select_topk: float = 1.0,
        int8_mask: bool = False) -> torch.Tensor:
    """SCE over task vectors τ_i = θ_i − θ_base.

    Select (``select_topk`` < 1): σ² = Var_i(τ_i) per entry (population variance); keep, for every
    model, the ⌊select_topk·nnz(σ²)⌋ entries of largest σ² (ties by position), zero the rest (when
    that count is 0, as on a tiny tensor, every entry is zeroed and the base is kept, as in mergekit).
    Calculate: w_i = mean(τ_i²)/Σ_j mean(τ_j²) (uniform when Σ_j mean(τ_j²) < 1e-6, mergekit's
    rule, which the paper does not have; kept for identical outputs). Erase: s = sign(Σ_i τ_i);
    θ = θ_base + Σ_{i: sign τ_i = s} w_i·τ_i / max(Σ_{i: sign τ_i = s} w_i, 1e-6).
    ``int8_mask`` has no effect.
    """
    base32 = base.to(torch.float32)
    n = len(tensors)
    buf = torch.empty_like(base32)

    def tv(i: int) -> torch.Tensor:
        return task_vector_into(buf, tensors[i], base32)

    select = None
    if select_topk < 1.0:
        mean = torch.zeros_like(base32)
        for i in range(n):
            mean.add_(tv(i))
        mean.div_(n)
        var = torch.zeros_like(base32)
        for i in range(n):
            d = tv(i).sub_(mean)
            var.addcmul_(d, d)
        del mean
        var.div_(n)
        k = int(int(torch.count_nonzero(var)) * select_topk)
        total = var.numel()
        select = rank_window(var, total - k, total)
        if select is None:
            select = torch.ones_like(var, dtype=torch.bool)
        del var

    def masked(i: int) -> torch.Tensor:
        x = tv(i)
        return x.mul_(select) if select is not None else x

    energy = []
    for i in range(n):
        x = masked(i)
        energy.append(float(torch.linalg.vector_norm(x).double() ** 2) / max(1, x.numel()))
    total_energy = sum(energy)
    w = [1.0 / n] * n if abs(total_energy) < 1e-6 else [e / total_energy for e in energy]

    positive = elect_sign(masked(i) for i in range(n))

    def weighted():
        for i in range(n):
            yield masked(i).mul_(w[i]), w[i]

    mixed = disjoint_merge(weighted(), positive, normalize=True, min_divisor=1e-6, scratch=True)
    return mixed.add_(base32)
