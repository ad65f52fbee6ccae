"""How a generated answer is scored, defined exactly (pure functions over strings).

For an example (prompt, answer) the model continues the prompt greedily (the most likely token at
every step) for at most ``tokens(answer) + EXTRA_TOKENS`` tokens. The *prediction* is that
continuation decoded without special tokens, cut at the end-of-sequence token and, when the
answer has no line break, at the first line break (:func:`prediction`). Then, with ``a`` the
answer and ``p`` the prediction, both stripped of surrounding whitespace:

- **exact match** (:func:`exact_match`): 1 when ``p == a``, else 0;
- **per-character accuracy** (:func:`char_accuracy`): the fraction of the answer's positions
  that the prediction reproduces, ``|{i < len(a) : i < len(p) and p[i] == a[i]}| / len(a)``
  (1 for an empty answer predicted empty, 0 for an empty answer otherwise). It credits partial
  answers (``cbd`` for ``cba`` scores 2/3) and does not realign shifted text.

A task's scores are the means over its examples; the mean row of ``eval`` averages the tasks
(each task counts once, whatever its size). Perplexity is ``exp`` of the mean negative
log-likelihood per predicted token over all the task's documents (:func:`perplexity`).
"""

from __future__ import annotations

import math

EXTRA_TOKENS = 4  # generated beyond the answer's length, to see whether the model stops


def prediction(continuation: str, answer: str) -> str:
    """The continuation cut at the first line break when the answer has none."""
    if "\n" not in answer:
        continuation = continuation.split("\n", 1)[0]
    return continuation


def exact_match(predicted: str, answer: str) -> float:
    return 1.0 if predicted.strip() == answer.strip() else 0.0


def char_accuracy(predicted: str, answer: str) -> float:
    p, a = predicted.strip(), answer.strip()
    if not a:
        return 1.0 if not p else 0.0
    return sum(1 for i, c in enumerate(a) if i < len(p) and p[i] == c) / len(a)


def perplexity(total_nll: float, tokens: int) -> float:
    return math.exp(total_nll / tokens) if tokens else float("nan")


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")
