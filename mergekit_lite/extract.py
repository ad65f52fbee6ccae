"""LoRA extraction: a PEFT LoRA adapter that approximates a fine-tune F of a base B.

``mergekit-lite extract-lora --base B --finetuned F --rank R OUT`` (and :func:`extract_lora`):

- every linear weight (a 2-d tensor of the layer stack) becomes a LoRA module: the truncated SVD of
  F − B (formed in float32 on the compute device, one tensor at a time) at rank R, or at the smallest
  rank ≤ R within a relative error (``--rank-error``) or keeping a fraction of the energy Σσ²
  (``--energy``). The SVD is the full thin SVD, whose truncation is the optimal rank-R approximation
  (as mergekit-extract-lora's); the singular values are split evenly between A and B, and the
  factors are stored in float32 by default (mergekit stores them in the model's dtype);
- embeddings and the output head, and every other tensor (norms, biases), are compared first, in a
  streamed pass, and those that differ are saved whole (``modules_to_save``); with ``--embed-lora``
  embeddings get an embedding LoRA and the head a LoRA instead. The bias of a LoRA module cannot
  be saved beside its LoRA (PEFT wraps a module once), so a changed one is reported, not kept;
- the report gives each module's rank and relative Frobenius error ‖Δ − BA‖/‖Δ‖, and the error over
  all modules together.
"""

from __future__ import annotations

import os

import torch

from .adapted import load
from .adapter_nodes import Differs, Factorise, Manifest
from .adapter_output import ONE_FILE, AdapterResult, target_modules
from .arch import detect
from .errors import MergeError, ShapeMismatch, TensorNotFound
from .executor import Executor
from .graph import Compiled, OutputSpec, assemble, input_paths
from .io.adapters import PREFIX
from .io.inputs import open_one
from .io.reader import ModelFiles
from .io.writer import PlannedTensor, ShardLayout
from .merge import Options, execute
from .nodes import Emit, Pick, Write
from .plan.schema import ModelRef
from .io.vocab import TokenizerOutput
from .steps import CardData, card_model

CONV1D_TYPES = {"gpt2"}  # models whose layer weights are stored [in, out] (transformers' Conv1D)


def extract_lora(base: str, finetuned: str, out: str | os.PathLike, *, rank: int = 32, rank_error: float | None = None,
                 energy: float | None = None, embed_lora: bool = False, dtype: str = "float32", device: str = "auto",
                 max_memory: str | int | None = None, overwrite: bool = False, quiet: bool = True) -> AdapterResult:
    """Write a PEFT LoRA adapter of `finetuned` − `base` into `out` (see the module docstring)."""
    if energy is not None:
        if not 0 < energy < 1:
            raise MergeError(f"--energy is the fraction of Σσ² kept, in (0, 1); got {energy}")
        rank_error = (1.0 - energy) ** 0.5
    if rank < 1 or (rank_error is not None and not 0 < rank_error < 1):
        raise MergeError(f"--rank must be >= 1 and --rank-error in (0, 1); got {rank}, {rank_error}")
    options = Options(device=device, max_memory=max_memory, overwrite=overwrite, quiet=quiet, dtype=dtype)
    b, f = (open_one(_ref(x), os.getcwd()) for x in (base, finetuned))
    kinds = _classify(b, f, embed_lora)
    changed = _changed(b, f, [n for n, k in kinds.items() if k != "linear"], options)
    compiled = _compile(base, finetuned, b, f, kinds, changed, rank, rank_error, options)
    stats = execute(compiled, os.fspath(out), options)
    spec = compiled.outputs[0]
    return AdapterResult(stats, spec.manifest, tuple(sorted(n for n in changed if kinds[n] == "whole")),
                         tuple(sorted(n for n in changed if kinds[n] == "bias")))


def _ref(text: str) -> ModelRef:
    repo, _, rev = text.rpartition("@") if "@" in text and not os.path.exists(text) else (text, "", "")
    return ModelRef(repo, rev or None)


def _classify(base: ModelFiles, ft: ModelFiles, embed_lora: bool) -> dict[str, str]:
    """Each tensor of the fine-tune: "linear" (LoRA), "embedding" (embedding LoRA), "whole" (saved
    whole if it differs) or "bias" (of a LoRA module: reported if it differs, not represented).
    Names and shapes must match the base's."""
    missing = sorted(set(ft.tensors) ^ set(base.tensors))
    if missing:
        raise TensorNotFound(f"the models have different tensors, e.g. {missing[0]}; extraction needs a fine-tune "
                             "with the base's tensors")
    arch = detect(ft.tensors, ft.config)
    kinds = {}
    for name, meta in ft.tensors.items():
        if meta.shape != base.tensors[name].shape:
            raise ShapeMismatch(f"tensor {name}: the fine-tune has {list(meta.shape)}, the base "
                                f"{list(base.tensors[name].shape)} (a resized vocabulary cannot be extracted)")
        section = arch.section(name)
        two_d = len(meta.shape) == 2 and name.endswith(".weight") and meta.dtype.is_floating_point
        if not two_d or (section in ("pre", "post") and not embed_lora):
            kinds[name] = "whole"
        else:
            kinds[name] = "embedding" if section == "pre" else "linear"
    for name in kinds:  # the bias of a LoRA module cannot be saved whole beside it (PEFT wraps a module once)
        if name.endswith(".bias") and kinds.get(name.removesuffix(".bias") + ".weight") in ("linear", "embedding"):
            kinds[name] = "bias"
    return kinds


def _changed(base: ModelFiles, ft: ModelFiles, names: list[str], options: Options) -> list[str]:
    """A first streamed pass: which of `names` differ between the two models."""
    sinks = []
    for name in names:
        node = Differs(load(ft.tensors[name], name, "fine-tune"), load(base.tensors[name], name, "base"), name, name)
        sinks.append(Emit(name, node, torch.bool, name))
    if not sinks:
        return []
    graph, groups, needs = assemble(sinks)
    compiled = Compiled(None, graph, groups, needs, None, (), ())
    runner = Executor(compiled, device=options.device, budget=options.budget(compiled))
    return [name for name, differs in runner.run() if bool(differs[0])]


def _compile(base_name: str, ft_name: str, base: ModelFiles, ft: ModelFiles, kinds: dict[str, str],
             changed: list[str], rank: int, rank_error: float | None, options: Options) -> Compiled:
    manifest = Manifest()
    conv1d = ft.config.get("model_type") in CONV1D_TYPES
    out_dtype = options.torch_dtype() or torch.float32
    sinks, planned, modules = [], [], set()
    for name, kind in kinds.items():
        if kind != "linear" and name not in changed:
            continue  # an unchanged embedding, norm, bias ...: nothing to save
        if kind == "bias":
            continue
        if kind == "whole":
            meta = ft.tensors[name]
            planned.append(PlannedTensor(PREFIX + name, meta.shape, meta.dtype))
            sinks.append(Write("", PREFIX + name, load(meta, name, "fine-tune"), meta.dtype, name))
            continue
        module = name.removesuffix(".weight")
        modules.add(module)
        transpose = kind == "embedding" or (conv1d and kind == "linear")
        node = Factorise(load(ft.tensors[name], name, "fine-tune"), load(base.tensors[name], name, "base"), module,
                         name, rank, rank_error, transpose, False, manifest)
        parts = ("lora_embedding_A", "lora_embedding_B") if kind == "embedding" else ("lora_A.weight", "lora_B.weight")
        for k, part in enumerate(parts):
            pick = Pick(node, k, name)
            planned.append(PlannedTensor(f"{PREFIX}{module}.{part}", pick.shape, out_dtype, rank_error is not None))
            sinks.append(Write("", f"{PREFIX}{module}.{part}", pick, out_dtype, name))
    graph, groups, needs = assemble(sinks)
    base_modules = {n.removesuffix(".weight") for n in base.tensors if n.endswith(".weight")}
    saved = sorted({n.rsplit(".", 1)[0] for n in changed if kinds[n] == "whole"})
    config = {"peft_type": "LORA", "base_model_name_or_path": base_name, "task_type": "CAUSAL_LM",
              "target_modules": target_modules(modules, base_modules), "modules_to_save": saved or None,
              "fan_in_fan_out": conv1d, "lora_dropout": 0.0, "bias": "none", "use_rslora": False, "use_dora": False,
              "init_lora_weights": True, "inference_mode": True}
    text = (f"# mergekit-lite extract-lora\nbase: {base_name}\nfinetuned: {ft_name}\nrank: {rank}\n"
            + (f"rank_error: {rank_error:g}\n" if rank_error is not None else ""))
    card = CardData(text, "extract-lora", (card_model(_ref(ft_name), ft), card_model(_ref(base_name), base)),
                    base_name, "https://arxiv.org/abs/2106.09685", "A LoRA adapter approximating the fine-tune's "
                    "difference from its base by a truncated SVD of each linear weight's delta.")
    spec = OutputSpec("", "adapter", tuple(planned), ShardLayout(planned, ONE_FILE, "adapter_model"), config,
                      TokenizerOutput(None), None, card, manifest)
    return Compiled(None, graph, groups, needs, None, (spec,), (), (), input_paths({"base": base, "ft": ft}))


__all__ = ["extract_lora", "AdapterResult"]
