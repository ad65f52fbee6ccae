"""Router (gate) weights: pure functions, no I/O. A layer's router is an (experts, hidden) matrix whose
row e scores how much a token's hidden state looks like what expert e should handle.

``cheap_embed`` (mergekit-moe's semantics, measured on 0.1.5 and kept bit for bit): every prompt of an
expert is tokenized as ``bos + prompt``; the embedding rows of all its tokens (all prompts, padding
masked) are summed in float32 and the sum L2-normalised. With negative prompts, their vector (made the
same way) is subtracted. The result is normalised once more (so a positive-only vector is divided by its
norm twice, as mergekit does). Every layer gets the same rows. To give the same float32 bits as
mergekit, the sums run over the same tensor shapes in the same order: the prompts left-padded to one
length, summed over positions, then over prompts.

``random``: standard normal rows; ``uniform_random``: U(−1/√hidden, 1/√hidden) (``nn.Linear``'s
initialisation). Each tensor draws from its own generator seeded by (plan seed, tensor name), so the
bits do not depend on the order tensors are made in (mergekit draws every layer from the global RNG).
"""

from __future__ import annotations

import math
from typing import Mapping, Sequence

import torch

Batch = Sequence[Sequence[int]]  # token ids of a list of prompts


def left_padded(batch: Batch, pad: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(ids, attention mask), both (prompts, longest) int64: the batch padded on the left with `pad`,
    as mergekit-moe's tokenizer call pads it."""
    width = max((len(p) for p in batch), default=0)
    ids = torch.tensor([[pad] * (width - len(p)) + list(p) for p in batch], dtype=torch.long).reshape(len(batch), width)
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in batch], dtype=torch.long)
    return ids, mask.reshape(len(batch), width)


def largest_batch(experts: Sequence[tuple[Batch, Batch]]) -> int:
    """Padded size (prompts × longest) of the largest batch of `experts`' (positive, negative) batches."""
    return max((max((len(p) for p in b), default=0) * len(b) for pos, neg in experts for b in (pos, neg)), default=0)


def prompt_vector(rows: torch.Tensor, index: Mapping[int, int], batch: Batch, pad: int) -> torch.Tensor:
    """(1, hidden) float32: the normalised sum of the embedding rows of every token of `batch`.

    `rows` holds the embedding rows that are needed, `index` maps a token id to its row there."""
    ids, mask = left_padded(batch, pad)
    where = torch.tensor([index[t] for t in ids.reshape(-1).tolist()], dtype=torch.long)
    hidden = rows.to(torch.float32)[where].reshape(*ids.shape, rows.shape[-1])
    embedded = (hidden * mask.unsqueeze(-1)).sum(dim=1).sum(dim=0, keepdim=True)
    return embedded / embedded.norm(dim=-1, keepdim=True).clamp(min=1e-8)


def expert_vector(rows: torch.Tensor, index: Mapping[int, int], positive: Batch, negative: Batch,
                  pad: int) -> torch.Tensor:
    """(1, hidden): the positive prompts' vector minus the negative prompts', normalised."""
    vec = prompt_vector(rows, index, positive, pad)
    if negative:
        vec = vec - prompt_vector(rows, index, negative, pad)
    return vec / vec.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)


def cheap_embed_gate(rows: torch.Tensor, index: Mapping[int, int], experts: Sequence[tuple[Batch, Batch]],
                     pad: int) -> torch.Tensor:
    """(experts, hidden) float32: one :func:`expert_vector` per expert (positive, negative batches)."""
    return torch.cat([expert_vector(rows, index, pos, neg, pad) for pos, neg in experts], dim=0)


def cheap_embed_workspace(hidden: int, experts: Sequence[tuple[Batch, Batch]], rows: int) -> int:
    """Bytes :func:`cheap_embed_gate` allocates at most, its result included: the float32 copy of the
    `rows` embedding rows, the largest batch gathered and masked (float32) with its index tensors, and
    a few (1, hidden) vectors per expert."""
    tokens = largest_batch(experts)
    return 4 * hidden * (rows + 2 * tokens + 8 * len(experts)) + 24 * tokens


def random_gate(shape: tuple[int, ...], seed: int, uniform: bool = False) -> torch.Tensor:
    """A seeded random router: standard normal, or U(−1/√hidden, 1/√hidden) when `uniform`."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    if not uniform:
        return torch.randn(shape, generator=gen, dtype=torch.float32)
    scale = math.sqrt(1.0 / shape[-1])
    return torch.rand(shape, generator=gen, dtype=torch.float32).mul_(2 * scale).sub_(scale)
