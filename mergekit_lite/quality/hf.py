"""A transformers model in memory, filled from the tensors the engine streams.

``eval`` and ``search`` never write a merge to disk to score it: the merge runs with Emit sinks
(:meth:`mergekit_lite.graph.Executor.run` hands each output tensor to Python as it is computed) and
every tensor is copied into the matching parameter of a model built from the output's config, so
memory holds the model plus the few tensors in flight. A model on disk is streamed the same way
(through its identity plan), so every model is read by one path, safetensors only.

transformers is an optional extra: without it these functions raise a :class:`MergeError` that
says how to install it. Models are built from ``config.json`` by ``AutoModelForCausalLM``; custom
code (``trust_remote_code``) is never run.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any, Iterable

import torch

from ..errors import MergeError


def transformers() -> Any:
    try:
        import transformers as tf
    except ImportError:
        raise MergeError("scoring models needs transformers: pip install 'mergekit-lite[transformers]'") from None
    return tf


def _no_init() -> contextlib.AbstractContextManager:
    """Skip random initialisation (every weight is overwritten by the stream)."""
    for module in ("transformers.initialization", "transformers.modeling_utils"):
        try:
            return __import__(module, fromlist=["no_init_weights"]).no_init_weights()
        except (ImportError, AttributeError):
            continue
    return contextlib.nullcontext()


def build_model(config: dict[str, Any], label: str, device: torch.device, dtype: torch.dtype) -> Any:
    """An (uninitialised) causal LM for `config` (a config.json mapping), in eval mode."""
    tf = transformers()
    config = dict(config)
    model_type = config.pop("model_type", None)
    if not model_type:
        raise MergeError(f"{label}: config.json has no model_type; cannot build a model to score")
    try:
        cfg = tf.AutoConfig.for_model(model_type, **config)
        with _no_init():
            model = tf.AutoModelForCausalLM.from_config(cfg)
        model.tie_weights()  # skipped with the initialisation in transformers 5
    except (ValueError, KeyError) as exc:
        raise MergeError(f"{label}: transformers cannot build a causal language model of type "
                         f"'{model_type}' ({exc}); custom model code is not run") from None
    return model.to(device=device, dtype=dtype).eval()


def _target(name: str, targets: dict[str, torch.Tensor], prefix: str) -> str | None:
    """The model's key for checkpoint tensor `name` (allowing a missing or extra base-model prefix)."""
    if name in targets:
        return name
    if prefix and f"{prefix}.{name}" in targets:
        return f"{prefix}.{name}"
    if prefix and name.startswith(prefix + ".") and name[len(prefix) + 1:] in targets:
        return name[len(prefix) + 1:]
    return None


def stream_into(model: Any, tensors: Iterable[tuple[str, torch.Tensor]], label: str) -> list[str]:
    """Copy every (name, tensor) into the model's matching parameter or buffer; returns the names
    the model has no place for. Raises when a shape differs or the model is left with a tensor
    nobody filled (a tied copy of a filled one counts as filled)."""
    targets = model.state_dict()
    prefix = getattr(model, "base_model_prefix", "") or ""
    filled: set[str] = set()
    unexpected: list[str] = []
    with torch.no_grad():
        for name, value in tensors:
            key = _target(name, targets, prefix)
            if key is None:
                unexpected.append(name)
                continue
            if tuple(targets[key].shape) != tuple(value.shape):
                raise MergeError(f"{label}: tensor {name} has shape {list(value.shape)} but the model built from "
                                 f"its config.json expects {list(targets[key].shape)}")
            targets[key].copy_(value)
            filled.add(key)
    storages = {targets[k].untyped_storage().data_ptr() for k in filled}
    missing = [k for k in targets if k not in filled and targets[k].untyped_storage().data_ptr() not in storages]
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise MergeError(f"{label}: the checkpoint lacks tensors its config.json needs: {shown}")
    return unexpected


def load_tokenizer(output: Any, label: str) -> Any:
    """The tokenizer an output folder would get (a :class:`~mergekit_lite.io.vocab.TokenizerOutput`:
    the donor's files, with any vocabulary edits), written to a temporary folder and loaded."""
    import tempfile

    from ..io.vocab import write_tokenizer

    tf = transformers()
    with tempfile.TemporaryDirectory(prefix="mergekit-lite-tokenizer-") as tmp:
        if not write_tokenizer(output, tmp):
            raise MergeError(f"{label}: no tokenizer files to score with (the model folder has none)")
        try:
            return tf.AutoTokenizer.from_pretrained(tmp)
        except (OSError, ValueError, TypeError) as exc:
            raise MergeError(f"{label}: cannot load the tokenizer from {output.folder}: {exc}") from None


class ModelCache:
    """One model per distinct (config, device, dtype), refilled for every candidate of a search
    instead of rebuilt."""

    def __init__(self) -> None:
        self._models: dict[str, Any] = {}
        self._tokenizers: dict[str, Any] = {}

    def model(self, config: dict[str, Any], label: str, device: torch.device, dtype: torch.dtype) -> Any:
        key = json.dumps(config, sort_keys=True, default=str) + f"|{device}|{dtype}"
        if key not in self._models:
            self._models.clear()  # hold one model at a time
            self._models[key] = build_model(config, label, device, dtype)
        return self._models[key]

    def tokenizer(self, output: Any, label: str) -> Any:
        key = repr(output)
        if key not in self._tokenizers:
            self._tokenizers[key] = load_tokenizer(output, label)
        return self._tokenizers[key]
