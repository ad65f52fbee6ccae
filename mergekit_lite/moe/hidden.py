"""``gate_mode: hidden`` (and ``hidden_avg``, ``hidden_last``): routers from the base model's hidden
states, which needs a forward pass, so ``transformers`` (the optional extra), used for this mode only.

mergekit-moe's semantics, kept: the base model is loaded in bfloat16; each expert's prompts run as one
left-padded batch (padding id: bos, else eos); the hidden state *entering* each layer (the embedding
output for layer 0) is taken at the last position (``hidden``, ``hidden_last``) or averaged over the
positions (``hidden_avg``, padding included, as mergekit does), averaged over the prompts; the
negative prompts' states are subtracted, and the result L2-normalised, all in bfloat16.

The forward pass runs once, when the first router is made, and its (experts, layers, hidden) result is
kept (small); the model is released at once. While it runs the whole base model is in memory (a
forward pass needs every layer): each router node declares that workspace, so the memory budget
covers it; the other gate modes are streamed tensor by tensor.
"""

from __future__ import annotations

import importlib.util
from typing import Any, Sequence

import torch

from ..errors import MergeError
from .gates import largest_batch, left_padded

Batch = Sequence[Sequence[int]]


class HiddenStates:
    """The hidden states of the base for every expert's prompts, computed once and shared."""

    def __init__(self, folder: str, prompts: Sequence[tuple[Batch, Batch]], pad: int, average: bool,
                 base_numel: int, layers: int, hidden: int):
        self.folder = folder
        self.prompts = prompts
        self.pad = pad
        self.average = average
        self.base_numel = base_numel
        self.layers = layers
        self.hidden = hidden
        self._states: torch.Tensor | None = None  # (experts, layers, hidden), bfloat16

    @property
    def workspace_bytes(self) -> int:
        """The bfloat16 model, and the hidden states of the longest batch (float32 bound, several copies)."""
        tokens = largest_batch(self.prompts)
        return 2 * self.base_numel + 16 * (self.layers + 2) * tokens * self.hidden + (4 << 20)

    def rows(self, layer: int, experts: Sequence[int], device: torch.device) -> torch.Tensor:
        """(len(experts), hidden) float32: these experts' rows of layer `layer`'s router."""
        if self._states is None:
            self._states = self._compute(device)
        return self._states[list(experts), layer].to(torch.float32)

    def _compute(self, device: torch.device) -> torch.Tensor:
        model = load_model(self.folder, device)
        found = []
        with torch.no_grad():
            for positive, negative in self.prompts:
                states = self._states_of(model, positive, device)
                if negative:
                    states -= self._states_of(model, negative, device)
                states /= states.norm(p=2, dim=-1, keepdim=True).clamp(min=1e-8)
                found.append(states.to("cpu"))
        del model
        return torch.stack(found, dim=0)

    def _states_of(self, model: Any, batch: Batch, device: torch.device) -> torch.Tensor:
        """(layers, hidden): the batch's mean hidden state entering each layer."""
        ids, mask = left_padded(batch, self.pad)
        output = model(input_ids=ids.to(device), attention_mask=mask.to(device), output_hidden_states=True,
                       return_dict=True)
        states = torch.stack(output.hidden_states[:-1])  # (layers, batch, positions, hidden)
        if self.layers != states.shape[0]:
            raise MergeError(f"{self.folder}: transformers gave hidden states for {states.shape[0]} layers, "
                             f"the model's tensors have {self.layers}")
        states = states.sum(dim=2) / states.shape[2] if self.average else states[:, :, -1, :]
        return states.sum(dim=1) / states.shape[1]


NEEDS_TRANSFORMERS = ("gate_mode hidden runs the base model to get its hidden states, which needs transformers: "
                      "pip install 'mergekit-lite[transformers]' (or use gate_mode: cheap_embed or random)")


def check_transformers() -> None:
    """Fail early (without importing it) when transformers is not installed."""
    if importlib.util.find_spec("transformers") is None:
        raise MergeError(NEEDS_TRANSFORMERS)


def load_model(folder: str, device: torch.device) -> Any:
    """The base model in bfloat16 through transformers (never its remote code)."""
    try:
        import transformers
        from transformers import AutoModelForCausalLM
    except ImportError:
        raise MergeError(NEEDS_TRANSFORMERS) from None
    key = "dtype" if int(transformers.__version__.split(".")[0]) >= 5 else "torch_dtype"
    transformers.utils.logging.disable_progress_bar()
    try:
        model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=False, low_cpu_mem_usage=True,
                                                     **{key: torch.bfloat16})
    except Exception as exc:  # transformers raises many kinds for a model it cannot build
        raise MergeError(f"{folder}: transformers cannot load the base model for gate_mode hidden "
                         f"({type(exc).__name__}: {exc})") from None
    return model.to(device).eval()
