"""Reading PEFT adapter folders (``adapter_config.json`` + ``adapter_model.safetensors``), headers only.

Why its own reader: an adapter is not a model. Its tensors are named after PEFT's wrapped modules
(``base_model.model.<module>.lora_A.weight``), its numbers only mean something together with the
config (``r``, ``lora_alpha``, ``use_rslora``, ``rank_pattern``/``alpha_pattern``, ``fan_in_fan_out``,
``feedforward_modules``, ``modules_to_save``), and many PEFT variants store tensors that a plain
low-rank delta cannot express. So this module turns a folder into :class:`AdapterFiles`: one
:class:`LoraModule` or :class:`IA3Module` per adapted module of the base, keyed by the base tensor it
changes, plus full replacement tensors (``modules_to_save``, saved embedding layers). Variants that
would be merged wrong are refused by name (:data:`REFUSED`), never silently approximated.

Where each adapted module sits in the base model (shapes, orientation) is checked against the base's
headers by :func:`bind`, which reports every problem naming both the adapter's tensor and the base's.
"""

from __future__ import annotations

import json
import math
import os
import re
from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import ModelNotFound
from .reader import TensorMeta, read_header

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
PREFIX = "base_model.model."
HUB_PATTERNS = [CONFIG_NAME, WEIGHTS_NAME]

# PEFT types other than LoRA and IA3, with the names people know them by.
_TYPE_NAMES = {"LOHA": "LoHa", "LOKR": "LoKr", "ADALORA": "AdaLoRA", "VERA": "VeRA", "BOFT": "BOFT",
               "OFT": "OFT", "FOURIERFT": "FourierFT", "HRA": "HRA", "VBLORA": "VB-LoRA", "LN_TUNING": "LN tuning",
               "PROMPT_TUNING": "prompt tuning", "PREFIX_TUNING": "prefix tuning", "P_TUNING": "P-tuning",
               "BONE": "Bone", "RANDLORA": "RandLoRA", "SHIRA": "SHiRA", "C3A": "C3A", "MISS": "MiSS"}

# LoRA config fields whose (non-default) value means a variant a plain delta cannot express:
# field -> (is it set?, the message).
REFUSED: dict[str, tuple[Any, str]] = {
    "use_dora": (lambda v: bool(v), "DoRA adapters are not supported (use_dora: true): their magnitude vectors "
                                    "rescale the merged weight, which a low-rank delta cannot express"),
    "bias": (lambda v: v not in (None, "none"), "adapters that train biases are not supported (bias: {value})"),
    "lora_bias": (lambda v: bool(v), "LoRA with a bias on lora_B is not supported (lora_bias: true)"),
    "target_parameters": (lambda v: bool(v), "LoRA on parameters (target_parameters) is not supported"),
    "trainable_token_indices": (lambda v: bool(v), "trainable tokens are not supported (trainable_token_indices)"),
    "layer_replication": (lambda v: bool(v), "layer replication is not supported (layer_replication)"),
    "use_qalora": (lambda v: bool(v), "QALoRA adapters are not supported (use_qalora: true)"),
    "alora_invocation_tokens": (lambda v: bool(v), "aLoRA adapters are not supported (alora_invocation_tokens)"),
    "kasa_config": (lambda v: bool(v), "KaSA adapters are not supported (kasa_config)"),
    "use_bdlora": (lambda v: bool(v), "block-diagonal LoRA is not supported (use_bdlora)"),
    "arrow_config": (lambda v: bool(v), "Arrow routing adapters are not supported (arrow_config)"),
    "velora_config": (lambda v: bool(v), "VeLoRA adapters are not supported (velora_config)"),
    "monteclora_config": (lambda v: bool(v), "MonteCLoRA adapters are not supported (monteclora_config)"),
    "init_lora_weights": (lambda v: isinstance(v, str) and v.split("_")[0] in ("pissa", "olora", "corda", "loftq"),
                          "{value} adapters are stored relative to a modified base model (init_lora_weights: "
                          "{value}); convert them to plain LoRA with PEFT first "
                          "(path_initial_model_for_weight_conversion)"),
}

_KEY = re.compile(r"^(?P<module>.+?)\.(?:"
                  r"(?P<lora>lora_A|lora_B)(?:\.[^.]+)?\.weight"
                  r"|(?P<emb>lora_embedding_A|lora_embedding_B)(?:\.[^.]+)?"
                  r"|(?P<ia3>ia3_l)(?:\.[^.]+)?"
                  r"|(?P<magnitude>lora_magnitude_vector)(?:\.[^.]+)?(?:\.weight)?"
                  r"|lora_B(?:\.[^.]+)?\.(?P<lbias>bias)"
                  r"|base_layer\.(?P<layer>weight|bias)"
                  r"|modules_to_save\.[^.]+\.(?P<mts>[^.]+))$")


@dataclass(frozen=True)
class LoraModule:
    """One LoRA-adapted module: ΔW = scaling · B @ A (transposed into the base's layout when
    ``transpose``: GPT-2 Conv1D weights and embeddings)."""

    module: str  # e.g. model.layers.0.self_attn.q_proj
    a: TensorMeta  # [r, in]
    b: TensorMeta  # [out, r]
    rank: int
    alpha: float
    scaling: float
    embedding: bool  # lora_embedding_A/B (A: [r, num_embeddings], B: [dim, r])
    fan_in_fan_out: bool  # from the config; the base's shape decides when it is not square

    @property
    def target(self) -> str:
        return self.module + ".weight"

    @property
    def factored_shape(self) -> tuple[int, int]:
        """Shape of B @ A."""
        return self.b.shape[0], self.a.shape[1]


@dataclass(frozen=True)
class IA3Module:
    """One IA3-adapted module: W scaled by the learned vector, per output row (the default) or per
    input column (``feedforward``: T-Few's l_ff on the down projection's input)."""

    module: str
    vector: TensorMeta  # [out, 1] or [1, in]
    feedforward: bool
    fan_in_fan_out: bool

    @property
    def target(self) -> str:
        return self.module + ".weight"


@dataclass
class AdapterFiles:
    """A PEFT adapter on local disk: its config and its adapted modules (headers only)."""

    path: str
    config: dict[str, Any]
    kind: str  # "lora" or "ia3"
    modules: dict[str, LoraModule | IA3Module]  # base tensor name -> module
    replaced: dict[str, TensorMeta] = field(default_factory=dict)  # base tensor name -> full tensor
    hub: Any = None  # where it came from on the Hub (io.resolve.HubRef); None for a local adapter

    def card_license(self) -> tuple[tuple[str, str], ...] | None:
        """The license keys of its card (README.md front matter)."""
        from .card import read_license

        return read_license(self.path)

    @property
    def label(self) -> str:
        return f"adapter '{self.path}'"

    @property
    def base_name(self) -> str | None:
        return self.config.get("base_model_name_or_path")

    @property
    def max_rank(self) -> int:
        return max((m.rank for m in self.modules.values() if isinstance(m, LoraModule)), default=0)


def is_adapter_folder(path: str) -> bool:
    return os.path.isdir(path) and os.path.isfile(os.path.join(path, CONFIG_NAME))


def adapter_as_model_error(path: str, shown: str) -> ModelNotFound:
    """The error for an adapter folder given where a full model is expected."""
    return ModelNotFound(f"{shown} is a PEFT adapter ({CONFIG_NAME}), not a full model: apply it to its base as "
                         f"'BASE+{shown}' (or {{base: BASE, adapter: {shown}}}), or merge adapters into an adapter "
                         "with 'output: adapter'")


def open_adapter(path: str) -> AdapterFiles:
    """Index a local adapter folder; refuses variants that cannot be merged as a plain delta."""
    config = _read_config(path)
    kind = _check_type(path, config)
    weights = os.path.join(path, WEIGHTS_NAME)
    if not os.path.isfile(weights):
        bins = [f for f in os.listdir(path) if f.endswith((".bin", ".pt"))]
        hint = (" It has pickle weights (" + ", ".join(bins) + "), which are not loaded because unpickling can "
                "run code; convert them to safetensors.") if bins else ""
        raise ModelNotFound(f"{path}: no {WEIGHTS_NAME}.{hint}")
    tensors, _ = read_header(weights)
    if kind == "lora":
        for key, (is_set, message) in REFUSED.items():
            value = config.get(key)
            if is_set(value):
                raise ModelNotFound(f"{path}: " + message.format(value=value))
    return _index(path, config, kind, tensors)


def _read_config(path: str) -> dict[str, Any]:
    file = os.path.join(path, CONFIG_NAME)
    if not os.path.isfile(file):
        what = "a model" if os.path.isdir(path) and any(f.endswith(".safetensors") for f in os.listdir(path)) else "it"
        raise ModelNotFound(f"{path} is not a PEFT adapter folder: {what} has no {CONFIG_NAME}")
    try:
        with open(file, encoding="utf-8") as fh:
            config = json.load(fh)
    except (OSError, ValueError) as exc:
        raise ModelNotFound(f"{file}: not a readable adapter config ({exc})") from None
    if not isinstance(config, dict):
        raise ModelNotFound(f"{file}: expected a JSON object")
    return config


def _check_type(path: str, config: dict[str, Any]) -> str:
    peft_type = str(config.get("peft_type", "")).upper()
    if peft_type in ("LORA", "IA3"):
        return peft_type.lower()
    if not peft_type:
        raise ModelNotFound(f"{os.path.join(path, CONFIG_NAME)}: no peft_type; expected LORA or IA3")
    name = _TYPE_NAMES.get(peft_type, peft_type)
    raise ModelNotFound(f"{path}: {name} adapters are not supported (peft_type {peft_type}); supported: LoRA, IA3")


def _index(path: str, config: dict[str, Any], kind: str, tensors: dict[str, TensorMeta]) -> AdapterFiles:
    parts: dict[str, dict[str, TensorMeta]] = {}
    replaced: dict[str, TensorMeta] = {}
    save = config.get("modules_to_save") or []
    for key, meta in tensors.items():
        if not key.startswith(PREFIX):
            raise ModelNotFound(f"{path}: tensor {key} does not start with '{PREFIX}'; not a PEFT adapter")
        name = key[len(PREFIX):]
        m = _KEY.match(name)
        if m is None:
            module, _, param = name.rpartition(".")
            if not module or not any(module == s or module.endswith("." + s) for s in save):
                raise ModelNotFound(f"{path}: tensor {key} is neither a {kind.upper()} factor nor part of a module "
                                    "listed in modules_to_save")
            replaced[name] = meta
            continue
        part = _part(path, key, m, kind)
        if part is None:  # a whole tensor: a saved embedding layer, or a module in modules_to_save
            replaced[f"{m.group('module')}.{m.group('layer') or m.group('mts')}"] = meta
        else:
            parts.setdefault(m.group("module"), {})[part] = meta
    modules = {}
    for module, found in parts.items():
        entry = _lora(path, config, module, found) if kind == "lora" else _ia3(path, config, module, found)
        modules[entry.target] = entry
    if not modules and not replaced:
        raise ModelNotFound(f"{path}: the adapter holds no {kind.upper()} tensors")
    return AdapterFiles(path, config, kind, modules, replaced)


def _part(path: str, key: str, m: re.Match, kind: str) -> str | None:
    """Which factor a key is (lora_A, lora_B, lora_embedding_A/B, ia3_l), or None for a whole tensor."""
    if m.group("magnitude"):
        raise ModelNotFound(f"{path}: DoRA adapters are not supported (tensor {key} is a DoRA magnitude vector)")
    if m.group("lbias"):
        raise ModelNotFound(f"{path}: LoRA with a bias on lora_B is not supported (tensor {key})")
    if m.group("layer") or m.group("mts"):
        return None
    part = m.group("lora") or m.group("emb") or m.group("ia3")
    expected = ("ia3_l",) if kind == "ia3" else ("lora_A", "lora_B", "lora_embedding_A", "lora_embedding_B")
    if part not in expected:
        raise ModelNotFound(f"{path}: tensor {key} does not belong in a {kind.upper()} adapter")
    return part


def _lora(path: str, config: dict[str, Any], module: str, found: dict[str, TensorMeta]) -> LoraModule:
    emb = "lora_embedding_A" in found or "lora_embedding_B" in found
    a, b = (found.get("lora_embedding_A"), found.get("lora_embedding_B")) if emb else (found.get("lora_A"),
                                                                                     found.get("lora_B"))
    if a is None or b is None or len(found) != 2:
        raise ModelNotFound(f"{path}: module {module} needs exactly one lora_A and one lora_B, found "
                            f"{', '.join(sorted(found))}")
    if len(a.shape) != 2 or len(b.shape) != 2:
        raise ModelNotFound(f"{path}: module {module}: LoRA on convolutions is not supported (lora_A "
                            f"{list(a.shape)}, lora_B {list(b.shape)})")
    rank = a.shape[0]
    if b.shape[1] != rank:
        raise ModelNotFound(f"{path}: module {module}: lora_A {list(a.shape)} and lora_B {list(b.shape)} disagree "
                            "on the rank")
    r = pattern_value(config.get("rank_pattern"), module, config.get("r", 8))
    if r != rank:
        raise ModelNotFound(f"{path}: module {module}: the config gives rank {r} but lora_A has {rank} rows")
    alpha = float(pattern_value(config.get("alpha_pattern"), module, config.get("lora_alpha", 8)))
    scaling = alpha / math.sqrt(rank) if config.get("use_rslora") else alpha / rank
    return LoraModule(module, a, b, rank, alpha, scaling, emb, bool(config.get("fan_in_fan_out")))


def _ia3(path: str, config: dict[str, Any], module: str, found: dict[str, TensorMeta]) -> IA3Module:
    vec = found.get("ia3_l")
    if vec is None or len(vec.shape) != 2 or 1 not in vec.shape:
        raise ModelNotFound(f"{path}: module {module}: expected an ia3_l vector of shape [n, 1] or [1, n], found "
                            + ", ".join(f"{k} {list(v.shape)}" for k, v in found.items()))
    feedforward = matches_modules(config.get("feedforward_modules"), module)
    if (vec.shape[0] == 1) != feedforward and vec.shape != (1, 1):
        raise ModelNotFound(f"{path}: module {module}: ia3_l has shape {list(vec.shape)}, but the config "
                            f"{'lists' if feedforward else 'does not list'} it in feedforward_modules")
    return IA3Module(module, vec, feedforward, bool(config.get("fan_in_fan_out")))


def pattern_value(patterns: Mapping[str, Any] | None, module: str, default: Any) -> Any:
    """PEFT's rank_pattern / alpha_pattern lookup: the first key (in order) that, as a regex, matches
    the end of the module's name at a dot boundary."""
    for key, value in (patterns or {}).items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def matches_modules(spec: Any, module: str) -> bool:
    """PEFT's target_modules rule: a list matches a module named by it or ending in '.' + it; a
    string is a regex that must match the whole name."""
    if not spec:
        return False
    if isinstance(spec, str):
        return re.fullmatch(spec, module) is not None
    return any(module == s or module.endswith("." + s) for s in spec)


@dataclass(frozen=True)
class Placement:
    """Where an adapted module's change lands in one tensor of the base."""

    module: LoraModule | IA3Module
    transpose: bool  # LoRA: ΔW = (B @ A)ᵀ; IA3: the vector is transposed before it scales W


def bind(adapter: AdapterFiles, shapes: Mapping[str, tuple[int, ...]], where: str
         ) -> tuple[dict[str, Placement], list[str]]:
    """Place every adapted module on the base whose tensor `shapes` are given (`where` names the base
    in messages). Returns {base tensor: placement} and the problems, each naming both sides."""
    placed: dict[str, Placement] = {}
    problems: list[str] = []
    for target, mod in adapter.modules.items():
        shape = shapes.get(target)
        if shape is None:
            problems.append(f"{adapter.label} adapts module {mod.module}, but {where} has no tensor {target}")
            continue
        transpose = _orientation(mod, shape)
        if transpose is None:
            problems.append(f"{adapter.label}: module {mod.module} ({_describe(mod)}) does not fit {where}'s "
                            f"{target} {list(shape)}")
            continue
        placed[target] = Placement(mod, transpose)
        bias = mod.module + ".bias"
        if isinstance(mod, IA3Module) and not mod.feedforward and bias in shapes:
            if shapes[bias] != (mod.vector.shape[0] * mod.vector.shape[1],):
                problems.append(f"{adapter.label}: module {mod.module}'s ia3_l {list(mod.vector.shape)} does not fit "
                                f"{where}'s {bias} {list(shapes[bias])}")
            placed[bias] = Placement(mod, transpose)
    for name, meta in adapter.replaced.items():
        shape = shapes.get(name)
        if shape is None:
            problems.append(f"{adapter.label} replaces {name} (modules_to_save or a saved layer), but {where} has "
                            "no such tensor")
        elif shape != meta.shape:
            problems.append(f"{adapter.label}: its {name} {list(meta.shape)} would replace {where}'s "
                            f"{list(shape)}; the shapes differ (a resized vocabulary?)")
    return placed, problems


def _orientation(mod: LoraModule | IA3Module, shape: tuple[int, ...]) -> bool | None:
    """Whether the change must be transposed to fit a base tensor of `shape` (None: it cannot fit).
    A square weight fits both ways: the config's fan_in_fan_out decides, as PEFT's does."""
    if len(shape) != 2:
        return None
    if isinstance(mod, LoraModule):
        out, inp = mod.factored_shape
        if mod.embedding:
            return True if shape == (inp, out) else None
        straight, flipped = shape == (out, inp), shape == (inp, out)
    else:
        v = mod.vector.shape

        def fits(s: tuple[int, ...]) -> bool:
            return all(a in (b, 1) for a, b in zip(s, shape)) and max(s) in shape

        straight, flipped = fits(v), fits(v[::-1])
    if straight and flipped:
        return mod.fan_in_fan_out
    return True if flipped else (False if straight else None)


def _describe(mod: LoraModule | IA3Module) -> str:
    if isinstance(mod, IA3Module):
        return f"ia3_l {list(mod.vector.shape)}"
    names = ("lora_embedding_A", "lora_embedding_B") if mod.embedding else ("lora_A", "lora_B")
    return f"{names[0]} {list(mod.a.shape)}, {names[1]} {list(mod.b.shape)}"
