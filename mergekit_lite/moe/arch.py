"""The MoE output architectures: which inputs each takes, where every tensor goes, its config.json.

Three are supported, in the checkpoint layout their Hub models use (which every transformers version
loads; transformers 5 fuses the experts itself when it loads them):

=============  =====================================  ==================  ======================
name           expert tensors (layer N, expert E)     router              inputs (model_type)
=============  =====================================  ==================  ======================
``mixtral``    ``block_sparse_moe.experts.E.w1/w2/w3``  ``block_sparse_moe   llama, mistral
               (gate_proj, down_proj, up_proj)          .gate``
``qwen2_moe``  ``mlp.experts.E.{gate,up,down}_proj``  ``mlp.gate``; one   llama, mistral, qwen2
                                                      shared expert
``qwen3_moe``  ``mlp.experts.E.{gate,up,down}_proj``  ``mlp.gate``        qwen3
=============  =====================================  ==================  ======================

mergekit-moe's ``architecture:`` is matched as it matches it (a prefix of the output's name, so
``qwen`` allows both Qwen forms); without the key, ``mixtral`` is preferred when the models allow it,
as mergekit does. mergekit's DeepSeek MoE output is not supported (its config needs remote code).
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from typing import Any

MLP_PROJS = ("gate_proj", "up_proj", "down_proj")  # a dense Llama-style MLP's weights
ATTENTION = ("input_layernorm.weight", "post_attention_layernorm.weight", "self_attn.q_proj.weight",
             "self_attn.k_proj.weight", "self_attn.v_proj.weight", "self_attn.o_proj.weight")
QKV_BIASES = ("self_attn.q_proj.bias", "self_attn.k_proj.bias", "self_attn.v_proj.bias")
DROPPED = ("self_attn.rotary_emb.inv_freq",)  # buffers some old checkpoints hold; recomputed on load
OUTSIDE = ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight")
ROUTER = {"output_router_logits": False, "router_aux_loss_coef": 0.001}


@dataclass(frozen=True)
class MoEArch:
    name: str  # the plan's spelling
    title: str  # mergekit's name for it (``architecture:`` matches a prefix of it)
    model_types: tuple[str, ...]  # input model types it takes
    shared_experts: int  # how many shared experts it needs (exactly)
    block: str  # the layer's MoE block: model.layers.N.<block>.
    slots: dict[str, str]  # MLP projection -> the expert's tensor name
    count_key: str  # config key of the number of experts
    model_type: str
    architecture: str
    layer_tensors: tuple[str, ...] = ATTENTION  # per-layer tensors kept from the base
    zero_biases: tuple[str, ...] = ()  # per-layer tensors written as zeros when the base lacks them
    settings: dict[str, Any] = field(default_factory=dict)  # fixed config entries

    def expert(self, layer: str, index: int, proj: str) -> str:
        return f"{layer}{self.block}.experts.{index}.{self.slots[proj]}.weight"

    def router(self, layer: str) -> str:
        return f"{layer}{self.block}.gate.weight"

    def shared(self, layer: str, proj: str) -> str:
        return f"{layer}{self.block}.shared_expert.{proj}.weight"

    def shared_router(self, layer: str) -> str:
        return f"{layer}{self.block}.shared_expert_gate.weight"

    def config(self, base: dict[str, Any], experts: int, per_token: int) -> dict[str, Any]:
        """config.json: the base's, as this architecture with `experts` experts, `per_token` per token."""
        out = copy.deepcopy(base)
        out["architectures"] = [self.architecture]
        out["model_type"] = self.model_type
        out[self.count_key] = experts
        out["num_experts_per_tok"] = per_token
        for key, value in self.settings.items():
            out[key] = base.get("intermediate_size") if value == "intermediate_size" else copy.deepcopy(value)
        return out


_SAME_PROJ = {p: p for p in MLP_PROJS}

ARCHS: dict[str, MoEArch] = {a.name: a for a in (
    MoEArch("mixtral", "Mixtral", ("llama", "mistral"), 0, "block_sparse_moe",
            {"gate_proj": "w1", "down_proj": "w2", "up_proj": "w3"}, "num_local_experts", "mixtral",
            "MixtralForCausalLM", settings={"sliding_window": None, "router_jitter_noise": 0.0, **ROUTER}),
    MoEArch("qwen2_moe", "Qwen MoE", ("llama", "mistral", "qwen2"), 1, "mlp", _SAME_PROJ, "num_experts",
            "qwen2_moe", "Qwen2MoeForCausalLM", ATTENTION + QKV_BIASES, QKV_BIASES,
            settings={"decoder_sparse_step": 1, "norm_topk_prob": True, "sliding_window": None,
                      "use_sliding_window": False, "qkv_bias": True, "mlp_only_layers": [],
                      "moe_intermediate_size": "intermediate_size",
                      "shared_expert_intermediate_size": "intermediate_size", **ROUTER}),
    MoEArch("qwen3_moe", "Qwen3 MoE", ("qwen3",), 0, "mlp", _SAME_PROJ, "num_experts", "qwen3_moe",
            "Qwen3MoeForCausalLM", ATTENTION + ("self_attn.q_norm.weight", "self_attn.k_norm.weight"),
            settings={"decoder_sparse_step": 1, "norm_topk_prob": True, "mlp_only_layers": [],
                      "moe_intermediate_size": "intermediate_size", **ROUTER}),
)}

UNSUPPORTED = {"deepseek": "mergekit's DeepSeek MoE output is not supported (its config.json needs remote code); "
                           "use mixtral, or qwen2_moe for a shared expert"}


def allowed() -> str:
    return ", ".join(ARCHS) + " (mergekit's spelling, a prefix of Mixtral, Qwen MoE or Qwen3 MoE, also works)"


def matching(given: str | None) -> tuple[str, ...] | str:
    """The architectures `architecture:` allows (all when not given), or a message why none."""
    if given is None:
        return tuple(ARCHS)
    key = given.strip().lower()
    if key in ARCHS:
        return (key,)
    for prefix, why in UNSUPPORTED.items():
        if key and prefix.startswith(key) or key.startswith(prefix):
            return why
    found = tuple(a.name for a in ARCHS.values() if key and a.title.lower().startswith(key))
    return found or f"unknown architecture {given!r}; allowed: {allowed()}"


def choose(candidates: tuple[str, ...], model_types: set[str], shared: int) -> MoEArch | str:
    """mergekit's choice: the candidates that take these models and shared experts; Mixtral first."""
    fits = [ARCHS[n] for n in candidates if ARCHS[n].shared_experts == shared and model_types <= set(ARCHS[n].model_types)]
    if fits:
        return next((a for a in fits if a.name == "mixtral"), fits[0])
    why = "; ".join(f"{ARCHS[n].name} takes {' or '.join(ARCHS[n].model_types)} models with "
                    f"{ARCHS[n].shared_experts} shared expert(s)" for n in candidates)
    return (f"no MoE output architecture takes {' and '.join(sorted(model_types))} models with {shared} shared "
            f"expert(s): {why}")
