"""Expanding a mixture of experts step into output tensors, from the inputs' headers only.

Where each output tensor comes from (:func:`expand_moe`):

- the base's embeddings, norms, attention and head: copied (renamed nowhere; rounded to ``dtype``);
- expert E's MLP of layer N: the expert model's ``mlp.{gate,up,down}_proj`` of layer N, copied
  under the architecture's expert name (:mod:`.arch`), or perturbed (noise / residual scale);
- each layer's router: generated (:mod:`.nodes`): from the prompts' embedding rows, seeded random
  numbers, or the base's hidden states; qwen2_moe also gets its shared expert and its 1-row gate.

Output dtype as mergekit-moe: ``dtype:``, else the base config's ``torch_dtype``, else each tensor's own.
Problems that need headers (an expert whose hidden size, intermediate size or depth differs from the
base's, mixed model types, tensors the output cannot hold) are plan errors with file:line:key.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping, Sequence

import torch

from ..dtypes import PLAN_DTYPES, parse_dtype
from ..errors import Issue, MergeError, PlanError
from ..nodes import stable_seed
from ..plan.expand import Input, OutputTensor, SourceInfo, StepLayout, order_names, output_config
from ..plan.recipe import Expert, MergePlan, ModelRef
from . import arch as moe_arch
from .nodes import EmbeddingRows, EmbedRouter, HiddenRouter, Perturbed, RandomRouter, Zeros

EMBED = "model.embed_tokens.weight"
LAYERS = "model.layers."


def expand_moe(plan: MergePlan, infos: Mapping[ModelRef, SourceInfo]) -> StepLayout:
    """Every output tensor of a mixture of experts step, and its config.json."""
    checks = _Checks(plan, infos)
    arch = checks.architecture()
    if arch is not None:
        checks.experts(arch)
        checks.base_tensors(arch)
    if checks.issues:
        raise PlanError(checks.issues)
    return _Placer(plan, infos, arch).layout()


class _Checks:
    def __init__(self, plan: MergePlan, infos: Mapping[ModelRef, SourceInfo]):
        self.plan, self.spec, self.infos = plan, plan.moe, infos
        self.base = infos[plan.base_model]
        self.issues: list[Issue] = []

    def issue(self, path: Sequence[Any], message: str) -> None:
        self.issues.append(self.plan.issue(tuple(path), message))

    def expert_path(self, expert: Expert) -> tuple:
        return expert.path[len(self.plan.prefix):] + ("source_model",)

    def architecture(self) -> moe_arch.MoEArch | None:
        base_type = self.base.config.get("model_type")
        if base_type is None:
            self.issue(("base_model",), f"{self.base.label} has no model_type in its config.json, so its "
                       "architecture is unknown")
            return None
        for e in self.spec.experts + self.spec.shared_experts:
            found = self.infos[e.source_model].config.get("model_type")
            if found != base_type:
                what = f"is a {found} model" if found else "has no model_type in its config.json"
                self.issue(self.expert_path(e), f"{self.infos[e.source_model].label} {what}, the base is a "
                           f"{base_type} model; the experts must have the base's architecture")
        chosen = moe_arch.choose(self.spec.architectures, {base_type}, len(self.spec.shared_experts))
        if isinstance(chosen, str):
            given = self.plan.doc is not None and self.plan.prefix + ("architecture",) in self.plan.doc.lines
            self.issue(("architecture",) if given else ("base_model",), chosen)
            return None
        return chosen

    def experts(self, arch: moe_arch.MoEArch) -> None:
        """Every expert has the base's depth and an MLP of the base's hidden and intermediate size."""
        layers, hidden, inter = _dims(self.base)
        if layers == 0 or self.base.arch.prefix != LAYERS:
            self.issue(("base_model",), f"{self.base.label} has no {LAYERS}N.* layers: an MoE is built from "
                       "Llama-style models")
            return
        for e in self.spec.experts + self.spec.shared_experts:
            info = self.infos[e.source_model]
            problem = _mlp_problem(info, layers, hidden, inter)
            if problem:
                self.issue(self.expert_path(e), f"{info.label} {problem}")

    def base_tensors(self, arch: moe_arch.MoEArch) -> None:
        """Every tensor of the base has a place in the output, and cheap_embed finds the embedding."""
        unplaced = [n for n in self.base.tensors if _role(self.base, n, arch) is None]
        if unplaced:
            self.issue(("base_model",), f"{self.base.label} has {len(unplaced)} tensor(s) a {arch.name} model cannot "
                       f"hold, e.g. {unplaced[0]}; allowed per layer: {', '.join(arch.layer_tensors)}")
        if self.spec.gate_mode == "cheap_embed" and EMBED not in self.base.tensors:
            self.issue(("gate_mode",), f"gate_mode cheap_embed reads {EMBED} of {self.base.label}, which lacks it")


def _dims(info: SourceInfo) -> tuple[int, int, int]:
    """(layers, hidden size, intermediate size) of a dense model, from its layer 0 MLP (config as fallback)."""
    gate = info.tensors.get(f"{LAYERS}0.mlp.gate_proj.weight")
    inter, hidden = gate.shape if gate is not None and len(gate.shape) == 2 else (
        info.config.get("intermediate_size", 0), info.config.get("hidden_size", 0))
    return info.arch.num_layers, hidden, inter


def _mlp_problem(info: SourceInfo, layers: int, hidden: int, inter: int) -> str | None:
    if info.arch.num_layers != layers:
        return f"has {info.arch.num_layers} layers, the base {layers}; every expert needs the base's depth"
    want = {"gate_proj": (inter, hidden), "up_proj": (inter, hidden), "down_proj": (hidden, inter)}
    for i in range(layers):
        for proj, shape in want.items():
            name = f"{LAYERS}{i}.mlp.{proj}.weight"
            got = info.tensors.get(name)
            if got is None:
                return f"lacks {name}: an expert is a dense model with gate_proj, up_proj and down_proj MLPs"
            if got.shape != shape:
                what = ("hidden size" if (got.shape[1] if proj != "down_proj" else got.shape[0]) != hidden
                        else "intermediate size")
                return (f"has {name} of shape {list(got.shape)}, the base's MLPs {list(shape)}: its {what} differs "
                        f"(hidden size {hidden}, intermediate size {inter} in the base)")
    return None


def _role(info: SourceInfo, name: str, arch: moe_arch.MoEArch) -> str | None:
    """What a base tensor becomes: 'copy', 'mlp' (replaced by the experts), 'drop', or None (no place)."""
    layer = info.arch.layer(name)
    if layer is None:
        return "copy" if name in moe_arch.OUTSIDE else None
    if layer.rest in arch.layer_tensors:
        return "copy"
    if layer.rest in tuple(f"mlp.{p}.weight" for p in moe_arch.MLP_PROJS):
        return "mlp"
    return "drop" if layer.rest in moe_arch.DROPPED else None


def out_dtype(plan: MergePlan, config: Mapping[str, Any]) -> torch.dtype | None:
    """mergekit-moe's choice: ``dtype:``, else the base config's torch_dtype (``dtype`` in transformers 5)."""
    if plan.dtype:
        return parse_dtype(plan.dtype)
    named = config.get("torch_dtype") or config.get("dtype")
    return PLAN_DTYPES.get(str(named).removeprefix("torch.")) if named else None


class _Placer:
    """Builds the output tensors in output order: embeddings, each layer's, final norm and head."""

    def __init__(self, plan: MergePlan, infos: Mapping[ModelRef, SourceInfo], arch: moe_arch.MoEArch):
        self.plan, self.spec, self.arch, self.infos = plan, plan.moe, arch, infos
        self.base = infos[plan.base_model]
        self.dtype = out_dtype(plan, self.base.config)
        _, self.hidden, _ = _dims(self.base)
        self.prompts = Prompts(plan.base_model, self.spec.experts + self.spec.shared_experts, self.base,
                               self.spec.gate_mode)

    def layout(self) -> StepLayout:
        by_layer: dict[int, list[str]] = {}
        pre, post = [], []
        for name in order_names(self.base.tensors, self.base.arch):
            layer = self.base.arch.layer(name)
            if layer is not None:
                by_layer.setdefault(layer.index, []).append(name)
            else:
                (pre if self.base.arch.section(name) == "pre" else post).append(name)
        out = [self.copy(self.plan.base_model, n, n) for n in pre]
        for i in range(self.base.arch.num_layers):
            out += [self.copy(self.plan.base_model, n, n) for n in by_layer.get(i, [])
                    if _role(self.base, n, self.arch) == "copy"]
            out += self.moe_layer(i, {self.base.arch.layer(n).rest for n in by_layer.get(i, [])})
        out += [self.copy(self.plan.base_model, n, n) for n in post]
        config = self.arch.config(self.base.config, len(self.spec.experts), self.spec.experts_per_token)
        return StepLayout(out, output_config(config, self.dtype, out), self.plan.base_model, plan=self.plan)

    def moe_layer(self, i: int, present: set[str]) -> list[OutputTensor]:
        prefix = f"{LAYERS}{i}."
        out = [self.zeros(prefix + rest, i) for rest in self.arch.zero_biases if rest not in present]
        n = len(self.spec.experts)
        out.append(self.router(self.arch.router(prefix), i, tuple(range(n))))
        for e, expert in enumerate(self.spec.experts):
            out += [self.expert(expert, i, proj, self.arch.expert(prefix, e, proj)) for proj in self.slot_order()]
        for expert in self.spec.shared_experts:
            out += [self.expert(expert, i, proj, self.arch.shared(prefix, proj)) for proj in moe_arch.MLP_PROJS]
            out.append(self.router(self.arch.shared_router(prefix), i, (n,)))
        return out

    def slot_order(self) -> list[str]:
        return sorted(self.arch.slots, key=lambda p: self.arch.slots[p])

    def dtype_of(self, ref: ModelRef, tensor: str) -> torch.dtype:
        own = self.infos[ref].tensors[tensor].dtype
        return self.dtype if (self.dtype is not None and own.is_floating_point) else own

    def copy(self, ref: ModelRef, tensor: str, name: str) -> OutputTensor:
        info = self.infos[ref].tensors[tensor]
        section = "layer" if self.base.arch.layer(name) else self.base.arch.section(name)
        return OutputTensor(name, info.shape, self.dtype_of(ref, tensor), (Input(ref, tensor),), None, copy=True,
                            section=section)

    def expert(self, expert: Expert, layer: int, proj: str, name: str) -> OutputTensor:
        tensor = f"{LAYERS}{layer}.mlp.{proj}.weight"
        residual = expert.residual_scale if proj == "down_proj" else None
        if expert.noise_scale is None and residual is None:
            return self.copy(expert.source_model, tensor, name)
        shape = self.infos[expert.source_model].tensors[tensor].shape
        make = partial(perturbed, name=name, shape=shape, source=Input(expert.source_model, tensor),
                       noise=expert.noise_scale, residual=residual)
        return OutputTensor(name, shape, self.dtype_of(expert.source_model, tensor),
                            (Input(expert.source_model, tensor),), None, section="layer", producer=make)

    def router(self, name: str, layer: int, rows: tuple[int, ...]) -> OutputTensor:
        shape = (len(rows), self.hidden)
        mode = self.spec.gate_mode
        if mode in ("random", "uniform_random"):
            make = partial(random_router, name=name, shape=shape, uniform=mode == "uniform_random")
        elif mode == "cheap_embed":
            make = partial(embed_router, name=name, shape=shape, prompts=self.prompts, rows=rows)
        else:
            make = partial(hidden_router, name=name, shape=shape, prompts=self.prompts, rows=rows, layer=layer)
        return OutputTensor(name, shape, self.dtype or torch.float32, (), None, section="layer", producer=make)

    def zeros(self, name: str, layer: int) -> OutputTensor:
        heads = self.base.tensors[name.replace(".bias", ".weight")].shape[0]
        return OutputTensor(name, (heads,), self.dtype or torch.float32, (), None, section="layer",
                            producer=partial(zeros, name=name, shape=(heads,)))


# -- producers: (sources, seed, group) -> the node of one generated tensor (OutputTensor.producer);
# sources maps each ModelRef of the step to its source (.node(tensor, group); .files for a model on disk)

class Prompts:
    """The experts' prompts, tokenized once with the base's tokenizer (and its hidden states, once)."""

    def __init__(self, base: ModelRef, experts: Sequence[Expert], info: SourceInfo, mode: str):
        self.base, self.experts, self.info, self.mode = base, experts, info, mode
        self._tokens: tuple[Any, ...] | None = None
        self._states: Any = None

    def files(self, sources: Mapping[ModelRef, Any]) -> Any:
        files = getattr(sources[self.base], "files", None)
        if files is None:
            raise MergeError(f"gate_mode {self.mode} reads the base model's tokenizer and weights from disk; "
                             f"base_model {self.base} is a step of this plan: use a model, or gate_mode: random")
        return files

    def tokens(self, sources: Mapping[ModelRef, Any]) -> tuple[Any, ...]:
        """(per expert (positive, negative) id batches, padding id, sorted distinct ids used)."""
        if self._tokens is None:
            from ..io.tokenizer import load_prompt_tokenizer

            folder = self.files(sources).folder
            tok = load_prompt_tokenizer(folder)
            batches = tuple((tok.batch(e.positive_prompts), tok.batch(e.negative_prompts)) for e in self.experts)
            ids = sorted({t for pos, neg in batches for b in (pos, neg) for p in b for t in p} | {tok.pad})
            vocab = self.info.tensors[EMBED].shape[0] if EMBED in self.info.tensors else None
            if vocab is not None and ids[-1] >= vocab:
                raise MergeError(f"the tokenizer of {folder} gives token id {ids[-1]}, but {EMBED} has {vocab} rows")
            self._tokens = (batches, tok.pad, tuple(ids))
        return self._tokens

    def states(self, sources: Mapping[ModelRef, Any]) -> Any:
        if self._states is None:
            from .hidden import HiddenStates, check_transformers

            check_transformers()  # before anything is written, not when the first router runs

            batches, pad, _ = self.tokens(sources)
            numel = sum(t.numel for t in self.files(sources).tensors.values())
            _, hidden, _ = _dims(self.info)
            self._states = HiddenStates(self.files(sources).folder, batches, pad, self.mode == "hidden_avg",
                                        numel, self.info.arch.num_layers, hidden)
        return self._states


def random_router(sources: Mapping[ModelRef, Any], seed: int, group: str, *, name: str, shape: tuple[int, ...],
                  uniform: bool) -> RandomRouter:
    return RandomRouter(name, group, shape, stable_seed(seed, "moe-router", name), uniform)


def embed_router(sources: Mapping[ModelRef, Any], seed: int, group: str, *, name: str, shape: tuple[int, ...],
                 prompts: Prompts, rows: tuple[int, ...]) -> EmbedRouter:
    batches, pad, ids = prompts.tokens(sources)
    files = prompts.files(sources)
    meta = files.tensors[EMBED]
    read = EmbeddingRows(meta.file, EMBED, group, meta.offset, meta.shape[1], meta.dtype, ids, str(prompts.base))
    return EmbedRouter(name, group, shape, read, tuple(batches[r] for r in rows), pad)


def hidden_router(sources: Mapping[ModelRef, Any], seed: int, group: str, *, name: str, shape: tuple[int, ...],
                  prompts: Prompts, rows: tuple[int, ...], layer: int) -> HiddenRouter:
    return HiddenRouter(name, group, shape, prompts.states(sources), layer, rows)


def perturbed(sources: Mapping[ModelRef, Any], seed: int, group: str, *, name: str, shape: tuple[int, ...],
              source: Input, noise: float | None, residual: float | None) -> Perturbed:
    node = sources[source.ref].node(source.tensor, group)
    return Perturbed(name, group, shape, node, noise, residual, stable_seed(seed, "moe-noise", name))


def zeros(sources: Mapping[ModelRef, Any], seed: int, group: str, *, name: str, shape: tuple[int, ...]) -> Zeros:
    return Zeros(name, group, shape)

