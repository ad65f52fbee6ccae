"""Outputs pinned bit for bit: every example plan (and a few variants that take other paths through
the engine: a multi-step plan with ``save:``, a float32 and a float16 override, results handed to
Python) must produce exactly the bytes recorded in ``tests/data/output_pins.json``.

The pins were recorded before the engine core was restructured (issue 8) and guard against any
behaviour change from refactoring. Regenerate them only for a deliberate change of results, with
``python tests/test_output_pins.py --record``, and say why in the commit.
"""

from __future__ import annotations

import glob
import hashlib
import json
import os
import sys

import mergekit_lite

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PINS = os.path.join(REPO, "tests", "data", "output_pins.json")
CONFIGS = os.path.join(REPO, "merge_configs")
PLANS = sorted(glob.glob(os.path.join(CONFIGS, "*.yml")))

MULTISTEP = """\
name: soup
merge_method: linear
models:
  - model: models/ft_math
    parameters: {weight: [0.2, 0.8]}
  - model: models/ft_code
    parameters: {weight: 0.4}
out_dtype: float32
save: SAVE
---
merge_method: ties
base_model: models/base
models:
  - model: soup
    parameters: {weight: 1.0, density: 0.7}
  - model: models/ft_chat
    parameters: {weight: -0.5, density: 0.5}
dtype: bfloat16
"""


def folder_digest(folder: str) -> dict[str, str]:
    """sha256 of each tensor file and of config.json in an output folder."""
    out = {}
    for name in sorted(os.listdir(folder)):
        if name.endswith((".safetensors", ".index.json")) or name == "config.json":
            with open(os.path.join(folder, name), "rb") as fh:
                out[name] = hashlib.sha256(fh.read()).hexdigest()
    return out


def emitted_digest(plan: str) -> str:
    """sha256 over the tensors handed to Python, in order (name, dtype, shape, bytes)."""
    from mergekit_lite.merge import Options, compile_plan
    from mergekit_lite.executor import Executor

    h = hashlib.sha256()
    compiled = compile_plan(plan, Options(), sink="emit")
    for name, tensor in Executor(compiled, device="cpu").run():
        h.update(f"{name}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        h.update(tensor.contiguous().view(-1).view(__import__("torch").uint8).numpy().tobytes())
    return h.hexdigest()


def cases(tmp: str) -> dict[str, dict[str, str]]:
    """Run every pinned case in `tmp`; returns case -> file -> sha256."""
    got: dict[str, dict[str, str]] = {}
    for plan in PLANS:
        name = os.path.basename(plan)
        out = os.path.join(tmp, name)
        mergekit_lite.run(plan, out)
        got[name] = folder_digest(out)
    task = os.path.join(CONFIGS, "task_arithmetic.yml")
    for dtype in ("float32", "float16"):
        out = os.path.join(tmp, f"task_arithmetic-{dtype}")
        mergekit_lite.run(task, out, dtype=dtype, max_shard_size="200KB")
        got[f"task_arithmetic.yml --dtype {dtype}"] = folder_digest(out)
    save = os.path.join(tmp, "soup-saved")
    multi = os.path.join(CONFIGS, ".pin-multistep.yml")
    with open(multi, "w", encoding="utf-8") as fh:
        fh.write(MULTISTEP.replace("SAVE", save))
    try:
        out = os.path.join(tmp, "multistep")
        mergekit_lite.run(multi, out)
        got["multistep"] = folder_digest(out)
        got["multistep save:"] = folder_digest(save)
        got["ties.yml emitted"] = {"tensors": emitted_digest(os.path.join(CONFIGS, "ties.yml"))}
    finally:
        os.remove(multi)
    return got


def test_outputs_are_bit_identical_to_the_pins(tmp_path):
    with open(PINS, encoding="utf-8") as fh:
        pins = json.load(fh)
    got = cases(str(tmp_path))
    assert set(got) == set(pins)
    for case, files in pins.items():
        assert got[case] == files, case


if __name__ == "__main__" and "--record" in sys.argv:
    import tempfile

    with tempfile.TemporaryDirectory() as tmp:
        result = cases(tmp)
    with open(PINS, "w", encoding="utf-8") as fh:
        json.dump(result, fh, indent=1, sort_keys=True)
        fh.write("\n")
    print(f"recorded {len(result)} cases in {PINS}")
