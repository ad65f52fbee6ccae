"""Architecture awareness from tensor names alone: where the layer stack is and how to renumber it.

No per-model tables: a layer-indexed tensor is one whose name has a numeric component
(``model.layers.7.mlp.up_proj.weight``, ``transformer.h.7.attn.c_attn.weight``,
``gpt_neox.layers.7...``, ``encoder.layer.7...``). The text before the first numeric component is
the stack's prefix; the prefix with the most tensors is the model's main layer stack. Names outside
any stack are split into *pre* weights (embeddings, which come first) and *post* weights (final
norm, heads).
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field
from typing import Any, Iterable

_LAYER = re.compile(r"^(?P<prefix>(?:[^.]+\.)+?)(?P<index>\d+)\.(?P<rest>.+)$")
_PRE = re.compile(r"(embed|wte|wpe|word_embeddings|position_embeddings|token_type_embeddings|"
                  r"embeddings\.|tok_embeddings|emb_ln|embedding)", re.IGNORECASE)
# names that are output heads even though they may contain "embed" (GPT-NeoX's embed_out)
_POST = re.compile(r"(lm_head|embed_out|^output\.|\.output\.weight$|score\.|classifier|pooler)", re.IGNORECASE)
# config keys holding the layer count, most specific first
LAYER_COUNT_KEYS = ("num_hidden_layers", "n_layer", "num_layers", "n_layers", "num_decoder_layers")
# config sub-dicts that may hold the text model's settings
SUBCONFIGS = ("text_config", "llm_config", "language_config")


@dataclass(frozen=True)
class LayerName:
    prefix: str  # e.g. 'model.layers.'
    index: int
    rest: str  # e.g. 'mlp.up_proj.weight'

    def renumber(self, index: int) -> str:
        return f"{self.prefix}{index}.{self.rest}"


def split_layer(name: str) -> LayerName | None:
    m = _LAYER.match(name)
    if not m:
        return None
    return LayerName(m.group("prefix"), int(m.group("index")), m.group("rest"))


def natural_key(name: str) -> tuple:
    """Sort key that orders layers.2 before layers.10."""
    return tuple(int(p) if p.isdigit() else p for p in re.split(r"(\d+)", name))


@dataclass
class Architecture:
    """What the names of one model's tensors say about its structure."""

    prefix: str | None  # main layer stack, e.g. 'model.layers.'
    num_layers: int  # of the main stack (0 without one)
    stacks: dict[str, int] = field(default_factory=dict)  # every stack prefix -> its layer count
    layer_key: str | None = None  # config key (dotted for sub-configs) that holds num_layers
    tied_embeddings: bool = False

    def layer(self, name: str) -> LayerName | None:
        """The name's place in the main stack, or None for pre/post/other-stack tensors."""
        ln = split_layer(name)
        return ln if ln is not None and ln.prefix == self.prefix else None

    def section(self, name: str) -> str:
        """'layer' (main stack), 'stack' (another numbered stack), 'pre' (embeddings) or 'post'."""
        ln = split_layer(name)
        if ln is not None and ln.prefix in self.stacks:
            return "layer" if ln.prefix == self.prefix else "stack"
        return "pre" if _PRE.search(name) and not _POST.search(name) else "post"

    def t(self, name: str) -> float:
        """Gradient position of a tensor in a whole-model (``models:``) merge: layer i of n has
        t = i/(n−1) (t = 1 when n = 1, as mergekit does); non-layer tensors have t = 0."""
        ln = split_layer(name)
        if ln is None or ln.prefix not in self.stacks:
            return 0.0
        n = self.stacks[ln.prefix]
        return ln.index / (n - 1) if n > 1 else 1.0


def detect(names: Iterable[str], config: dict[str, Any] | None = None) -> Architecture:
    """Find the layer stacks among `names`; cross-check the layer count with config.json."""
    config = config or {}
    counts: Counter[str] = Counter()
    max_index: dict[str, int] = {}
    for name in names:
        ln = split_layer(name)
        if ln is None:
            continue
        counts[ln.prefix] += 1
        max_index[ln.prefix] = max(max_index.get(ln.prefix, -1), ln.index)
    stacks = {p: max_index[p] + 1 for p in counts}
    prefix = max(counts, key=lambda p: (counts[p], -len(p))) if counts else None
    num_layers = stacks.get(prefix, 0) if prefix else 0
    key = find_layer_key(config, num_layers) if prefix else None
    tied = bool(get_tied(config))
    return Architecture(prefix, num_layers, stacks, key, tied)


def config_problem(config: dict[str, Any]) -> str | None:
    """What is wrong with the config.json keys mergekit-lite interprets (model_type, architectures,
    the layer counts, tie_word_embeddings, the text sub-configs), or None. Other keys are copied
    as they are."""
    if not isinstance(config.get("model_type", ""), str):
        return f"model_type must be a string, got {config['model_type']!r:.40}"
    arches = config.get("architectures", [])
    if arches is not None and not (isinstance(arches, list) and all(isinstance(a, str) for a in arches)):
        return f"architectures must be a list of class names, got {arches!r:.40}"
    for sub in SUBCONFIGS:
        if config.get(sub) is not None and not isinstance(config[sub], dict):
            return f"{sub} must be an object, got {config[sub]!r:.40}"
    for prefix, cfg in [("", config)] + [(f"{s}.", config[s]) for s in SUBCONFIGS if isinstance(config.get(s), dict)]:
        for key in LAYER_COUNT_KEYS:
            v = cfg.get(key)
            if v is not None and (isinstance(v, bool) or not isinstance(v, int) or v < 0):
                return f"{prefix}{key} must be a non-negative integer, got {v!r:.40}"
        if not isinstance(cfg.get("tie_word_embeddings", False), bool):
            return f"{prefix}tie_word_embeddings must be true or false, got {cfg['tie_word_embeddings']!r:.40}"
    return None


def get_tied(config: dict[str, Any]) -> bool:
    for cfg in [config] + [config.get(s) for s in SUBCONFIGS if isinstance(config.get(s), dict)]:
        if "tie_word_embeddings" in cfg:
            return bool(cfg["tie_word_embeddings"])
    return False


def find_layer_key(config: dict[str, Any], num_layers: int) -> str | None:
    """The config key (``text_config.num_hidden_layers`` for nested configs) holding the layer count:
    the first known key whose value equals `num_layers`, else the first known key present."""
    candidates = []
    for key in LAYER_COUNT_KEYS:
        if isinstance(config.get(key), int):
            candidates.append((key, config[key]))
    for sub in SUBCONFIGS:
        if isinstance(config.get(sub), dict):
            for key in LAYER_COUNT_KEYS:
                if isinstance(config[sub].get(key), int):
                    candidates.append((f"{sub}.{key}", config[sub][key]))
    for key, value in candidates:
        if value == num_layers:
            return key
    return candidates[0][0] if candidates else None


def get_dotted(config: dict[str, Any], key: str) -> Any:
    cur: Any = config
    for part in key.split("."):
        cur = cur.get(part) if isinstance(cur, dict) else None
    return cur


def set_dotted(config: dict[str, Any], key: str, value: Any) -> None:
    parts = key.split(".")
    cur = config
    for part in parts[:-1]:
        cur = cur.setdefault(part, {})
    cur[parts[-1]] = value
