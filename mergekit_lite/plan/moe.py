"""Reading a mergekit-moe config (``base_model`` + ``experts:``) into a step, every problem at once.

A document with ``experts:`` is a mixture of experts (mergekit-moe's ``MoEMergeConfig``); it becomes
an ordinary :class:`~mergekit_lite.plan.recipe.MergePlan` whose ``moe`` holds the experts, so the rest
of the engine (inputs, compiling, output folders, ``plan``) takes it like any step. The parser is a
:class:`~mergekit_lite.plan.parser.StepParser` with other keys: model references, ``dtype``,
``tokenizer_source`` and ``seed`` are read by the same code as in a merge.

Checked here, before any model is opened, each with file:line:key: unknown keys (mergekit-moe drops
them silently), ``gate_mode``, ``experts_per_token`` (at least 1, at most the number of experts), the
``architecture`` name, shared experts the architectures allow, prompts where the gate mode needs them,
and prompts identical for every expert (mergekit refuses those too). Checks that need the models'
headers (hidden sizes, layer counts, model types) are in :mod:`mergekit_lite.moe.layout`.
"""

from __future__ import annotations

from typing import Any

from ..moe.arch import ARCHS, matching
from . import tokenizer as tok
from .parser import Keys, StepParser
from .recipe import Expert, MergePlan, MoESpec
from .source import Path

MOE_KEYS = {
    "base_model": "the model whose attention, embeddings and norms the MoE keeps (required)",
    "experts": "the models whose MLPs become the experts (required)",
    "gate_mode": "how the routers are made: hidden (default), hidden_avg, hidden_last, cheap_embed, random, "
                 "uniform_random",
    "experts_per_token": "experts each token is routed to (default 2)",
    "shared_experts": "experts every token goes through (qwen2_moe: exactly one)",
    "architecture": "the output: mixtral, qwen2_moe or qwen3_moe (default: chosen from the models)",
    "dtype": "dtype written (default: the base config's torch_dtype)",
    "tokenizer_source": "where the tokenizer comes from: base (default), or a model",
    "seed": "seed of random gates and expert noise (default 0)",
    "name": "the step's name (multi-step plans, where the experts may be earlier steps)",
}
MOE = Keys(tuple(MOE_KEYS), "unknown key '{key}' in a mixture of experts config (experts:); allowed: {allowed}")
EXPERT = Keys(("source_model", "positive_prompts", "negative_prompts", "noise_scale", "residual_scale"),
              "unknown key '{key}' in an expert; allowed: {allowed}")

# gate_mode -> whether it builds the routers from the experts' prompts
GATE_MODES = {"hidden": True, "hidden_avg": True, "hidden_last": True, "cheap_embed": True,
              "random": False, "uniform_random": False}


def is_moe(data: Any) -> bool:
    """A document is a mixture of experts config when it has ``experts:``."""
    return isinstance(data, dict) and "experts" in data


class MoEParser(StepParser):
    """Reads one mergekit-moe document into a MergePlan with ``moe`` set."""

    def parse(self) -> MergePlan | None:
        n_before = len(self.issues)
        self.check_keys((), self.data, MOE)
        base = self.base_model("base_model")
        if "base_model" not in self.data:
            self.report((), "missing key 'base_model' (the model whose attention, embeddings and norms are kept)")
        dtype = self.dtype("dtype")
        tokenizer = self.moe_tokenizer_source("tokenizer_source")
        seed = self.seed("seed")
        name = self.name("name")
        mode = self.gate_mode()
        experts = self.expert_list("experts", required=True)
        shared = self.expert_list("shared_experts", required=False)
        per_token = self.experts_per_token(len(experts))
        archs = self.architectures(len(shared))
        self.check_prompts(mode, experts, "experts")
        self.check_prompts(mode, shared, "shared_experts")
        if len(self.issues) > n_before or base is None:
            return None
        spec = MoESpec(tuple(experts), tuple(shared), mode, per_token, archs, self.prefix)
        return MergePlan("moe", base, None, None, {}, dtype=dtype, tokenizer_source=tokenizer, seed=seed, moe=spec,
                         name=name, doc=self.doc, prefix=self.prefix)

    def moe_tokenizer_source(self, key: str) -> Any:
        """``base`` or a model: the experts share the base's vocabulary, so there is nothing to unite."""
        source = tok.tokenizer_source(self, key)
        if source == "union":
            self.report((key,), "a mixture of experts keeps the base's vocabulary; allowed: base or a model")
            return None
        return source

    def gate_mode(self) -> str:
        mode = self.data.get("gate_mode", "hidden")
        if mode not in GATE_MODES:
            self.report(("gate_mode",), f"unknown gate_mode {mode!r}; allowed: {', '.join(GATE_MODES)}")
            return "random"
        return mode

    def experts_per_token(self, n_experts: int) -> int:
        k = self.data.get("experts_per_token", 2)
        if isinstance(k, bool) or not isinstance(k, int) or k < 1:
            self.report(("experts_per_token",), f"experts_per_token is an integer >= 1, got {k!r}")
        elif n_experts and k > n_experts:
            self.report(("experts_per_token",), f"experts_per_token {k} is more than the {n_experts} experts "
                        f"given; allowed: 1 to {n_experts}")
        return k

    def architectures(self, shared: int) -> tuple[str, ...]:
        found = matching(self.data.get("architecture"))
        if isinstance(found, str):
            self.report(("architecture",), found)
            return ()
        if not any(ARCHS[n].shared_experts == shared for n in found):
            where = ("shared_experts",) if "shared_experts" in self.data else ("architecture",)
            takes = ", ".join(f"{n} takes {ARCHS[n].shared_experts}" for n in found)
            self.report(where, f"{shared} shared expert(s) given; {takes}")
        return found

    def expert_list(self, key: str, required: bool) -> list[Expert]:
        raw = self.data.get(key)
        if raw is None:
            if required:
                self.report((key,) if key in self.data else (), f"missing key '{key}': a list of experts "
                            "(each '- source_model: PATH' with positive_prompts)")
            return []
        if not isinstance(raw, list) or (required and not raw):
            self.report((key,), "expected a non-empty list of experts (each '- source_model: PATH')")
            return []
        found = [self.expert((key, i), entry) for i, entry in enumerate(raw)]
        return [e for e in found if e is not None]

    def expert(self, path: Path, entry: Any) -> Expert | None:
        if isinstance(entry, str):
            entry = {"source_model": entry}
        if not isinstance(entry, dict):
            self.report(path, f"expected a mapping with 'source_model' and prompts, got {entry!r}")
            return None
        self.check_keys(path, entry, EXPERT)
        if "source_model" not in entry:
            self.report(path, "missing key 'source_model'")
            return None
        ref = self.model_ref(path + ("source_model",), entry["source_model"])
        prompts = [self.prompts(path + (k,), entry.get(k)) for k in ("positive_prompts", "negative_prompts")]
        noise = self.scale(path + ("noise_scale",), entry.get("noise_scale"), minimum=0.0)
        residual = self.scale(path + ("residual_scale",), entry.get("residual_scale"), minimum=None)
        if ref is None:
            return None
        return Expert(ref, prompts[0], prompts[1], noise, residual, self.prefix + path)

    def prompts(self, path: Path, raw: Any) -> tuple[str, ...]:
        if raw is None:
            return ()
        if not isinstance(raw, list) or not all(isinstance(p, str) for p in raw):
            self.report(path, f"expected a list of strings, got {raw!r}")
            return ()
        return tuple(raw)

    def scale(self, path: Path, raw: Any, minimum: float | None) -> float | None:
        if raw is None:
            return None
        if isinstance(raw, bool) or not isinstance(raw, (int, float)) or (minimum is not None and raw < minimum):
            self.report(path, f"expected a number{'' if minimum is None else f' >= {minimum:g}'}, got {raw!r}")
            return None
        return float(raw)

    def check_prompts(self, mode: str, experts: list[Expert], key: str) -> None:
        """Prompt-built gates need prompts; identical prompts for every expert route nothing."""
        if key == "experts" and len(experts) > 1 and len({e.source_model for e in experts}) == 1:
            self.warnings.append("every expert is the same model: the MoE costs more than that model and computes "
                                 "the same thing until it is trained")
        if not GATE_MODES[mode]:
            return
        for e in experts:
            if not e.positive_prompts:
                self.report(e.path[len(self.prefix):], f"gate_mode {mode} builds this expert's router row from its "
                            "prompts: give positive_prompts (a list of strings), or use gate_mode: random")
        if key == "experts" and len(experts) > 1 and all(e.positive_prompts for e in experts):
            if len({(e.positive_prompts, e.negative_prompts) for e in experts}) == 1:
                self.report((key,), "every expert has the same prompts, so the router cannot tell them apart; "
                            "give each expert prompts for what it should handle")
