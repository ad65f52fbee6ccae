"""The Python form of a mixture of experts: :func:`upcycle` builds an expression that lowers to
mergekit-moe's YAML, so the Python API and the CLI run the same plan and give the same bits.

Experts may be any expression (a model, or a merge computed in the same pass), so
``upcycle(base, [base.ties([math, code], density=0.5), Model("chat")], gate_mode="random")`` is one
plan, one streamed pass, no intermediate model on disk.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

from ..api import Expr, Model
from ..lowering import Lowering

EXPERT_KEYS = ("positive_prompts", "negative_prompts", "noise_scale", "residual_scale")


def upcycle(base: Expr | str | os.PathLike, experts: Sequence[Any], *, gate_mode: str = "hidden",
            experts_per_token: int = 2, shared_experts: Sequence[Any] = (), architecture: str | None = None,
            dtype: str | None = None, tokenizer_source: str | None = None) -> "MoE":
    """A mixture of experts (sparse upcycling, mergekit-moe's config) with `base`'s attention,
    embeddings and norms and one expert per entry of `experts`.

    An expert is a model (an expression or a path), a ``(model, positive_prompts)`` or
    ``(model, positive_prompts, negative_prompts)`` tuple, or a mapping with mergekit-moe's keys
    (``source_model``, ``positive_prompts``, ``negative_prompts``, ``noise_scale``, ``residual_scale``).
    The other arguments are the config's keys, with its defaults. Checked when built (headers only).
    """
    return MoE(_model(base), tuple(_expert(e) for e in experts), tuple(_expert(e) for e in shared_experts),
               {"gate_mode": gate_mode, "experts_per_token": experts_per_token, "architecture": architecture,
                "dtype": dtype, "tokenizer_source": tokenizer_source})._checked()


def _model(x: Any) -> Expr:
    if isinstance(x, Expr):
        return x
    if isinstance(x, (str, os.PathLike)):
        return Model(x)
    raise TypeError(f"expected a model (an expression or a path), got {type(x).__name__} {x!r}")


def _expert(e: Any) -> dict[str, Any]:
    if isinstance(e, Mapping):
        unknown = set(e) - {"source_model", *EXPERT_KEYS}
        if unknown or "source_model" not in e:
            raise TypeError(f"an expert mapping has source_model and {', '.join(EXPERT_KEYS)}; got {sorted(e)}")
        return {**e, "source_model": _model(e["source_model"])}
    if isinstance(e, tuple) and 2 <= len(e) <= 3:
        out = {"source_model": _model(e[0]), "positive_prompts": list(e[1])}
        if len(e) == 3:
            out["negative_prompts"] = list(e[2])
        return out
    return {"source_model": _model(e)}


class MoE(Expr):
    def __init__(self, base: Expr, experts: tuple[dict, ...], shared: tuple[dict, ...], settings: dict):
        self.base, self.experts, self.shared, self.settings = base, experts, shared, settings

    def __repr__(self) -> str:
        return f"upcycle({self.base!r}, [{', '.join(repr(e['source_model']) for e in self.experts)}])"

    def _leaves(self):
        yield from self.base._leaves()
        for e in self.experts + self.shared:
            yield from e["source_model"]._leaves()

    def _doc(self, low: Lowering) -> dict:
        def entries(experts: tuple[dict, ...]) -> list[dict]:
            return [{**e, "source_model": low.ref(e["source_model"])} for e in experts]

        doc: dict[str, Any] = {"base_model": low.ref(self.base), "experts": entries(self.experts)}
        if self.shared:
            doc["shared_experts"] = entries(self.shared)
        doc.update((k, v) for k, v in self.settings.items() if v is not None)
        return doc
