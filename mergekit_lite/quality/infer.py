"""Running a transformers model on a task: greedy continuations and perplexity.

Greedy decoding batches prompts *of the same token length* only, so no sequence is ever padded:
every row sees exactly what it would see alone (no attention masks or position offsets, which
architectures handle differently), and the result does not depend on the batch size beyond
floating-point summation order. A row stops at the end-of-sequence token; the batch stops when
every row has stopped or reached its token limit (:mod:`.scoring` defines the limit and the cut).
"""

from __future__ import annotations

import inspect
from collections import defaultdict
from typing import Any

import torch

from .scoring import EXTRA_TOKENS, prediction
from .tasks import Task, TaskFileError


def encode_prompt(tokenizer: Any, prompt: str) -> list[int]:
    """The prompt's ids as the tokenizer encodes a text by default (a BOS token where the model
    family uses one); an end-of-sequence token a tokenizer appends is removed."""
    ids = list(tokenizer(prompt)["input_ids"])
    eos = tokenizer.eos_token_id
    if ids and eos is not None and ids[-1] == eos and len(ids) > 1:
        ids = ids[:-1]
    return ids


def eos_ids(model: Any, tokenizer: Any, extra: Any = None) -> set[int]:
    """Every end-of-sequence id the tokenizer, the model's config or `extra` (a model folder's
    generation_config.json value: one id or a list) names."""
    found = {tokenizer.eos_token_id}
    for value in (getattr(model.config, "eos_token_id", None), extra):
        found.update(value if isinstance(value, (list, tuple)) else [value])
    return {i for i in found if isinstance(i, int) and not isinstance(i, bool)}


def cache_keyword(model: Any) -> str:
    """transformers 5.25 renamed ``past_key_values`` (argument and output) to ``cache``."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


@torch.no_grad()
def _greedy_batch(model: Any, ids: torch.Tensor, steps: int, stop: set[int]) -> list[list[int]]:
    """Greedy continuation of equal-length rows, with the key/value cache."""
    out: list[list[int]] = [[] for _ in range(ids.shape[0])]
    done = torch.zeros(ids.shape[0], dtype=torch.bool, device=ids.device)
    key = cache_keyword(model)
    past, step_ids = None, ids
    for _ in range(steps):
        result = model(input_ids=step_ids, use_cache=True, **({key: past} if past is not None else {}))
        past = result[key]
        nxt = result.logits[:, -1].argmax(dim=-1)
        for row, token in enumerate(nxt.tolist()):
            if not done[row]:
                out[row].append(token)
        done |= torch.tensor([t in stop for t in nxt.tolist()], device=ids.device)
        if bool(done.all()):
            break
        step_ids = nxt[:, None]
    return out


def generate(model: Any, tokenizer: Any, task: Task, device: torch.device, batch_size: int = 64,
             stop: set[int] | None = None) -> list[str]:
    """Each example's prediction (see :mod:`.scoring`), in the task's order; `stop`: the
    end-of-sequence ids (default :func:`eos_ids`)."""
    limit = getattr(model.config, "max_position_embeddings", None)
    stop = stop if stop is not None else eos_ids(model, tokenizer)
    by_length: dict[int, list[int]] = defaultdict(list)
    prompts = [encode_prompt(tokenizer, p) for p, _ in task.examples]
    budgets = [len(tokenizer(a, add_special_tokens=False)["input_ids"]) + EXTRA_TOKENS for _, a in task.examples]
    for i, ids in enumerate(prompts):
        if not ids:
            raise TaskFileError(f"{task.path}:{task.lines[i]}: the prompt is empty for this tokenizer (no tokens)")
        if limit and len(ids) >= limit:
            raise TaskFileError(f"{task.path}:{task.lines[i]}: the prompt is {len(ids)} tokens, the model's "
                                f"context is {limit}")
        by_length[len(ids)].append(i)
    texts = [""] * len(prompts)
    for length in sorted(by_length):
        rows = by_length[length]
        for start in range(0, len(rows), batch_size):
            chunk = rows[start:start + batch_size]
            steps = max(budgets[i] for i in chunk)
            if limit:
                steps = min(steps, limit - length)
            ids = torch.tensor([prompts[i] for i in chunk], dtype=torch.long, device=device)
            for i, tokens in zip(chunk, _greedy_batch(model, ids, steps, stop)):
                tokens = [t for t in tokens if t not in stop]
                texts[i] = prediction(tokenizer.decode(tokens, skip_special_tokens=True), task.examples[i][1])
    return texts


@torch.no_grad()
def negative_log_likelihood(model: Any, tokenizer: Any, task: Task, device: torch.device,
                            max_length: int = 1024) -> tuple[float, int]:
    """(Σ −log p(token | the tokens before it in its window), number of predicted tokens) over the
    task's documents, each cut into windows of the model's context (at most `max_length`) that
    overlap by one token, so that every token but a document's first is predicted once."""
    window = min(max_length, getattr(model.config, "max_position_embeddings", None) or max_length)
    total, count = 0.0, 0
    for text in task.texts:
        ids = list(tokenizer(text)["input_ids"])
        for start in range(0, max(1, len(ids) - 1), window - 1):
            piece = torch.tensor([ids[start:start + window]], dtype=torch.long, device=device)
            if piece.shape[1] < 2:
                continue
            logits = model(input_ids=piece).logits[0, :-1].float()
            nll = torch.nn.functional.cross_entropy(logits, piece[0, 1:], reduction="sum")
            total += float(nll)
            count += piece.shape[1] - 1
    return total, count
