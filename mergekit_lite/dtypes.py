"""Names of tensor dtypes: plan spelling, torch dtype, safetensors header code, element size."""

from __future__ import annotations

import torch

from .errors import MergeError

# plan name -> torch dtype. mergekit accepts bfloat16|float16|float32|int64 with an optional
# ``torch.`` prefix; we accept those plus a few common aliases.
PLAN_DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
    "fp32": torch.float32,
    "fp16": torch.float16,
    "bf16": torch.bfloat16,
    "half": torch.float16,
    "float": torch.float32,
}

# safetensors header code <-> torch dtype
ST_TO_TORCH: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        ST_TO_TORCH["F8_E4M3" if "e4m3" in _name else "F8_E5M2"] = getattr(torch, _name)
TORCH_TO_ST: dict[torch.dtype, str] = {v: k for k, v in ST_TO_TORCH.items()}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    """Plan spelling (``bfloat16``, ``torch.float16``, ``bf16``) or a torch dtype (one of those the
    plan names allow) -> torch dtype; KeyError if unknown."""
    if isinstance(name, torch.dtype):
        if name not in PLAN_DTYPES.values():
            raise KeyError(name)
        return name
    if not isinstance(name, str):
        raise KeyError(name)
    key = name[len("torch.") :] if name.startswith("torch.") else name
    return PLAN_DTYPES[key]


def dtype_name(dtype: torch.dtype) -> str:
    """torch.bfloat16 -> 'bfloat16' (the spelling used in config.json's torch_dtype)."""
    return str(dtype).removeprefix("torch.")


def numel(shape) -> int:
    """Number of elements of a tensor of `shape` (1 for a scalar)."""
    n = 1
    for d in shape:
        n *= d
    return n


def element_size(dtype: torch.dtype) -> int:
    return dtype.itemsize  # (not a tensor made to ask: the planner asks thousands of times)


def is_float(dtype: torch.dtype) -> bool:
    return dtype.is_floating_point


def all_finite(tensor: torch.Tensor) -> bool:
    """No inf/NaN. An inf or NaN entry makes the sum inf or NaN, so a finite sum settles it in one
    cheap pass; only a non-finite sum (which finite entries could also give, by overflow) is
    checked entry by entry, in chunks so the boolean mask stays small."""
    if tensor.numel() == 0 or not tensor.dtype.is_floating_point or bool(torch.isfinite(tensor.sum())):
        return True
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(chunk).all()) for chunk in flat.split(1 << 22))


def check_rounded(src: torch.Tensor, rounded: torch.Tensor, name: str, clamp: bool = False) -> None:
    """The one rule for values as written: `rounded` (`src` rounded to the output dtype, or `src`
    itself) must be finite. A finite value too large for the dtype rounds to inf: that is an error
    naming the tensor, or, with `clamp`, it is replaced in `rounded` by the dtype's largest value
    of the same sign. inf or NaN already in `src` is always an error."""
    if all_finite(rounded):
        return
    if not all_finite(src):
        raise MergeError(f"tensor {name} holds inf or NaN; check the inputs and the parameters for this tensor")
    top = torch.finfo(rounded.dtype).max
    if clamp:
        rounded.nan_to_num_(nan=0.0, posinf=top, neginf=-top)  # no NaN: finite values round to ±inf at worst
        return
    largest = float(src.abs().max())
    raise MergeError(f"tensor {name}: values up to {largest:.6g} overflow {dtype_name(rounded.dtype)} (largest "
                     f"{top:.6g}) when rounded; write a wider dtype (--dtype float32), or clamp them to "
                     f"±{top:.6g} with --clamp-overflow")
