"""Small, reproducible example adapters of the example base model (``mergekit-lite examples``).

Three PEFT adapters of ``merge_configs/models/base``, in PEFT's on-disk format, that the example
plans fold into the base, concatenate, merge and re-factorise:

- ``lora_attn``: LoRA of rank 8 (α 16) on the attention projections, o_proj at rank 4 (α 8) through
  ``rank_pattern`` / ``alpha_pattern``;
- ``lora_mlp``: rsLoRA (α/√r) of rank 4 (α 8) on the MLP projections and q_proj, so that q_proj is
  changed by both LoRAs and the others by one;
- ``ia3`` and ``ia3_chat``: IA3 scaling vectors (k/v outputs and the down projection's input).

Values come from NumPy's PCG64 generator seeded per tensor (as the example models), so the files
are identical on every machine; the tests check the committed copies against a regeneration.
"""

from __future__ import annotations

import json
import os
import shutil
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from .examples import LLAMA_CONFIG, llama_shapes
from .nodes import stable_seed

PREFIX = "base_model.model."
LORA_DEFAULTS: dict[str, Any] = {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
                                 "lora_dropout": 0.0, "fan_in_fan_out": False, "bias": "none", "use_rslora": False,
                                 "use_dora": False, "modules_to_save": None, "rank_pattern": {}, "alpha_pattern": {},
                                 "init_lora_weights": True, "inference_mode": True}
IA3_DEFAULTS: dict[str, Any] = {"peft_type": "IA3", "task_type": "CAUSAL_LM", "base_model_name_or_path": None,
                                "fan_in_fan_out": False, "modules_to_save": None, "init_ia3_weights": True,
                                "inference_mode": True}


def save_adapter(folder: str, config: dict[str, Any], tensors: dict[str, Any]) -> str:
    """Write a PEFT adapter folder: adapter_config.json and adapter_model.safetensors (tensor names
    without the ``base_model.model.`` prefix get it)."""
    os.makedirs(folder, exist_ok=True)
    ts = {(k if k.startswith(PREFIX) else PREFIX + k):
          (torch.from_numpy(np.ascontiguousarray(v)) if isinstance(v, np.ndarray) else v.contiguous())
          for k, v in tensors.items()}
    save_file(ts, os.path.join(folder, "adapter_model.safetensors"), metadata={"format": "pt"})
    with open(os.path.join(folder, "adapter_config.json"), "w", encoding="utf-8") as fh:
        json.dump(config, fh, indent=2, sort_keys=True)
        fh.write("\n")
    return folder


def _targeted(shapes: dict[str, tuple[int, ...]], targets: list[str]):
    """(tensor name, module, its last name, shape) of every 2-d weight whose module ends in a target."""
    for name, shape in shapes.items():
        module = name.removesuffix(".weight")
        leaf = module.rsplit(".", 1)[-1]
        if len(shape) == 2 and leaf in targets:
            yield name, module, leaf, shape


def lora_tensors(shapes: dict[str, tuple[int, ...]], targets: list[str], ranks: dict[str, int], seed: int,
                 std_b: float = 0.01) -> dict[str, np.ndarray]:
    """lora_A ~ N(0, 1/in) and lora_B ~ N(0, std_b²) for every weight whose module ends in a target."""
    out = {}
    for name, module, leaf, shape in _targeted(shapes, targets):
        r = ranks.get(leaf, ranks["*"])
        rng = np.random.default_rng(stable_seed("lora", seed, name))
        out[f"{module}.lora_A.weight"] = rng.normal(0, shape[1] ** -0.5, (r, shape[1])).astype(np.float32)
        out[f"{module}.lora_B.weight"] = rng.normal(0, std_b, (shape[0], r)).astype(np.float32)
    return out


def ia3_tensors(shapes: dict[str, tuple[int, ...]], targets: list[str], feedforward: list[str], seed: int,
                std: float = 0.05) -> dict[str, np.ndarray]:
    """ia3_l ~ 1 + N(0, std²): [out, 1] (rows) for most targets, [1, in] (columns) for feedforward ones."""
    out = {}
    for name, module, leaf, shape in _targeted(shapes, targets):
        rng = np.random.default_rng(stable_seed("ia3", seed, name))
        size = (1, shape[1]) if leaf in feedforward else (shape[0], 1)
        out[f"{module}.ia3_l"] = (1.0 + rng.normal(0, std, size)).astype(np.float32)
    return out


def example_adapters(seed: int = 0) -> dict[str, tuple[dict[str, Any], dict[str, np.ndarray]]]:
    """The example adapters: name -> (adapter_config.json, tensors)."""
    shapes = llama_shapes(LLAMA_CONFIG)
    attn = ["q_proj", "k_proj", "v_proj", "o_proj"]
    mlp = ["gate_proj", "up_proj", "down_proj", "q_proj"]
    return {
        "lora_attn": (dict(LORA_DEFAULTS, r=8, lora_alpha=16, target_modules=attn, rank_pattern={"o_proj": 4},
                           alpha_pattern={"o_proj": 8}),
                      lora_tensors(shapes, attn, {"*": 8, "o_proj": 4}, seed + 1)),
        "lora_mlp": (dict(LORA_DEFAULTS, r=4, lora_alpha=8, use_rslora=True, target_modules=mlp),
                     lora_tensors(shapes, mlp, {"*": 4}, seed + 2, std_b=0.02)),
        "ia3": (dict(IA3_DEFAULTS, target_modules=["k_proj", "v_proj", "down_proj"], feedforward_modules=["down_proj"]),
                ia3_tensors(shapes, ["k_proj", "v_proj", "down_proj"], ["down_proj"], seed + 3)),
        "ia3_chat": (dict(IA3_DEFAULTS, target_modules=["v_proj", "down_proj"], feedforward_modules=["down_proj"]),
                     ia3_tensors(shapes, ["v_proj", "down_proj"], ["down_proj"], seed + 4)),
    }


def write_adapters(target: str) -> list[str]:
    """Write the example adapters under `target` (replacing what is there); returns their folders."""
    out = []
    for name, (config, tensors) in example_adapters().items():
        folder = os.path.join(target, name)
        if os.path.isdir(folder):
            shutil.rmtree(folder)
        out.append(save_adapter(folder, dict(config, base_model_name_or_path="models/base"), tensors))
    return out
