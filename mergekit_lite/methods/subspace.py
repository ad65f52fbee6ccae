"""Singular-vector steps shared by the merges that work on each layer's *task matrix* (TSV-Merge,
Iso-C, Iso-CTS), named as in the papers.

A layer's task matrix is its task vector τ_i = θ_i − θ_base seen as a matrix. The methods factor
it, Δ = U·Σ·Vᵀ, keep some of its singular components, make singular vectors of different tasks
orthogonal to each other and rebuild a matrix:

- :func:`top_components`: the k largest singular components (a low-rank approximation);
- :func:`orthogonalize`: the polar factor P·Qᵀ of X = P·S·Qᵀ, the matrix with orthonormal
  columns (or rows) nearest to X — TSV's "whitening" of the stacked singular vectors;
- :func:`isotropic`: a flat spectrum, every singular value replaced by their mean (Iso-C);
- :func:`compose`: U·diag(σ)·Vᵀ.

Decision (a deviation from the papers' code that changes nothing on matrices of full numerical
rank): singular components whose value is numerically zero (σ ≤ max(m, n)·ε₃₂·scale, NumPy's
``matrix_rank`` rule) are not part of the matrix. The papers' code keeps them, and their singular
vectors are whatever LAPACK or cuSOLVER completes the basis with: a rank-deficient task matrix (a
LoRA fine-tune, a layer only some tasks changed, two tasks sharing a direction) would then add
arbitrary directions, different on every device. Dropping them makes every result a function of
the task matrices alone.

Embeddings, output heads and non-matrix tensors (norms, biases) are not factored: the papers' code
merges them as the mean of the task vectors (:func:`mean_task_vector`).

Reproducibility: LAPACK's blocked SVD gives last-bit differences between thread counts. Small
matrices (up to :data:`SMALL` entries, where threads gain nothing) are factored on one thread, so
small models merge to the same bits on every machine; larger ones use every thread, as matrix
products do.

Memory: a float32 SVD of an m×n matrix allocates its input's column-major copy, U, S, Vᵀ and
LAPACK's work array; measured on MKL (1 and 2 threads) at most 7.2 times the matrix's float32 size
for square matrices, plus about 2 MB of fixed buffers. :data:`SVD_UNITS` and :data:`SVD_SCRATCH`
declare it with margin (checked by ``tests/test_methods_tsv_iso.py``, which measures peak RSS,
since LAPACK's buffers are invisible to the allocation probe).
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

from ..lazy import torch

from .gta import task_vector_into

EPS32 = 2.0 ** -23  # float32's machine epsilon
SVD_UNITS = 8.0  # output-sized float32 units alive during one SVD, its outputs included
SVD_SCRATCH = 4 << 20  # fixed bytes of an SVD beyond SVD_UNITS (LAPACK/threading buffers)
MATRIX_SECTIONS = ("layer", "stack")  # 2-D weights of these sections are factored
SMALL = 1 << 18  # matrices up to this many entries are factored on one thread


def is_task_matrix(shape: tuple[int, ...] | torch.Size, section: str) -> bool:
    """A 2-D weight of the network's layers; embeddings and heads (sections ``pre``/``post``) and
    non-matrix tensors are merged as the mean of the task vectors instead, as in the papers' code."""
    return len(shape) == 2 and section in MATRIX_SECTIONS


def weighted_task_vectors(tensors: Iterable[torch.Tensor], base32: torch.Tensor, weight: list[float]
                          ) -> Iterator[torch.Tensor]:
    """w_i·τ_i = w_i·(θ_i − θ_base), one at a time in one reused float32 buffer (each value is valid
    until the next is drawn)."""
    buf = torch.empty_like(base32)
    for tensor, w in zip(tensors, weight):
        task_vector_into(buf, tensor, base32)
        yield buf if w == 1.0 else buf.mul_(w)


def sum_task_vectors(tensors: list[torch.Tensor], base32: torch.Tensor, weight: list[float]) -> torch.Tensor:
    """Σ_i w_i·τ_i (the task-arithmetic sum), in float32."""
    total = torch.zeros_like(base32)
    for tau in weighted_task_vectors(tensors, base32, weight):
        total.add_(tau)
    return total


def mean_task_vector(tensors: list[torch.Tensor], base32: torch.Tensor, weight: list[float]) -> torch.Tensor:
    """(1/T)·Σ_i w_i·τ_i: how the papers merge what they do not factor."""
    return sum_task_vectors(tensors, base32, weight).div_(len(tensors))


def tolerance(shape: tuple[int, ...] | torch.Size, scale: float | torch.Tensor) -> float:
    """Singular values at or below this are numerically zero: max(m, n)·ε₃₂·scale, where scale is
    the matrix's largest singular value (or an upper bound of it)."""
    return max(shape) * EPS32 * float(scale)


@contextmanager
def _one_thread_if_small(matrix: torch.Tensor) -> Iterator[None]:
    threads = torch.get_num_threads()
    if matrix.device.type != "cpu" or matrix.numel() > SMALL or threads == 1:
        yield
        return
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def svd(matrix: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The thin SVD U·diag(σ)·Vᵀ (σ descending); small CPU matrices on one thread."""
    with _one_thread_if_small(matrix):
        return torch.linalg.svd(matrix, full_matrices=False)


def top_components(matrix: torch.Tensor, k: int, scale: float | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The k largest singular components of `matrix`: U[:, :k], σ[:k], Vᵀ[:k]. Components with a
    numerically zero σ (relative to `scale`, default the largest σ) are zeroed in all three."""
    u, s, vh = svd(matrix)
    if scale is None:
        scale = float(s[0]) if s.numel() else 0.0
    u, s, vh = u[:, :k], s[:k], vh[:k]
    keep = s > tolerance(matrix.shape, scale)
    if not bool(keep.all()):
        u, s, vh = u * keep, s * keep, vh * keep[:, None]
    return u, s, vh


def orthogonalize(stacked: torch.Tensor) -> torch.Tensor:
    """The polar factor of X: with X = P·S·Qᵀ, the matrix P·Qᵀ whose columns (X tall) or rows (X
    wide) are orthonormal and nearest to X's. Restricted to X's numerical range: directions with a
    numerically zero singular value are dropped, not completed with arbitrary null-space vectors
    (so two tasks sharing a singular vector contribute it once, at their mean strength)."""
    p, s, qh = svd(stacked)
    keep = s > tolerance(stacked.shape, s[0]) if s.numel() else s.bool()
    if not bool(keep.all()):
        p, qh = p[:, keep], qh[keep]
    return p @ qh


def isotropic(s: torch.Tensor) -> torch.Tensor:
    """A flat spectrum: every non-zero singular value replaced by their mean (zeros stay zero, so
    the sum of singular values, the nuclear norm, is kept)."""
    nonzero = s > 0
    count = int(nonzero.sum())
    if count == 0:
        return torch.zeros_like(s)
    return torch.where(nonzero, s.sum() / count, torch.zeros_like(s))


def compose(u: torch.Tensor, s: torch.Tensor, vh: torch.Tensor) -> torch.Tensor:
    """U·diag(σ)·Vᵀ."""
    return (u * s) @ vh


def add_scaled(base32: torch.Tensor, delta: torch.Tensor, lambda_: float) -> torch.Tensor:
    """θ_base + λ·Δ, in the buffer of Δ."""
    return delta.mul_(lambda_).add_(base32)
