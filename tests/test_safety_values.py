"""Values as written: a finite float32 result that overflows the output dtype when rounded is an
error naming the tensor (the check runs after rounding, wherever rounding happens: the writer, a
merge feeding a later step, a tensor handed to Python), or, with ``clamp_overflow``, is clamped to
the dtype's largest value. inf/NaN from an input is an error, clamping or not."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch

import mergekit_lite
from mergekit_lite import cli
from mergekit_lite.errors import MergeError
from mergekit_lite.examples import LLAMA_CONFIG, save_model

from conftest import load_dir, write_plan

NAME = "model.layers.1.mlp.up_proj.weight"


@pytest.fixture
def big(models, tmp_path):
    """Two fine-tunes whose sum overflows float16 (max 65504) in one tensor: 3 entries of 40000 each."""
    paths = {}
    for key, value in (("x", 40000.0), ("y", 30000.0)):
        t = {k: v.copy() for k, v in models["tensors"]["a"].items()}
        t[NAME] = t[NAME].copy()
        t[NAME].reshape(-1)[[0, 5, 7]] = [value, -value, value]
        paths[key] = save_model(str(tmp_path / key), t, LLAMA_CONFIG)
    return paths


def soup(tmp_path, p, dtype="float16", extra=""):
    return write_plan(tmp_path, f"""
        merge_method: linear
        models:
          - {{model: {p['x']}, parameters: {{weight: 1.0}}}}
          - {{model: {p['y']}, parameters: {{weight: 1.0}}}}
        parameters: {{normalize: false}}
        dtype: {dtype}
        {extra}
        """, f"soup-{dtype}.yml")


def test_overflow_after_rounding_is_an_error_naming_the_tensor(big, tmp_path, capsys):
    out = str(tmp_path / "out")
    assert cli.main(["run", soup(tmp_path, big), out, "-q"]) == 2
    err = capsys.readouterr().err
    assert f"tensor {NAME}: values up to 70000 overflow float16 (largest 65504)" in err and "--clamp-overflow" in err
    assert not os.path.exists(out) and not [f for f in os.listdir(tmp_path) if f.startswith(".out")]


def test_clamp_overflow_clamps_to_the_dtype_range(big, models, tmp_path):
    out = str(tmp_path / "out")
    assert cli.main(["run", soup(tmp_path, big), out, "-q", "--clamp-overflow"]) == 0
    got = load_dir(out)[NAME]
    a = models["tensors"]["a"][NAME].astype(np.float64).reshape(-1).copy()
    a[[0, 5, 7]] = 0
    expected = 2 * a
    expected[[0, 5, 7]] = [70000, -70000, 70000]
    expected = np.clip(expected, -65504, 65504).astype(np.float16)
    assert got.dtype == torch.float16 and np.array_equal(got.reshape(-1).numpy(), expected)


def test_bfloat16_overflow_near_the_float32_limit(models, tmp_path):
    """3.4e38 is finite in float32 and rounds to inf in bfloat16 (largest 3.3895e38)."""
    t = {k: v.copy() for k, v in models["tensors"]["a"].items()}
    t[NAME] = np.full_like(t[NAME], 1.7e38)
    p = {"x": save_model(str(tmp_path / "x"), t, LLAMA_CONFIG), "y": save_model(str(tmp_path / "y"), t, LLAMA_CONFIG)}
    with pytest.raises(MergeError, match=f"tensor {NAME}: values up to 3.4e\\+38 overflow bfloat16"):
        mergekit_lite.run(soup(tmp_path, p, "bfloat16"), str(tmp_path / "o"))
    mergekit_lite.run(soup(tmp_path, p, "bfloat16"), str(tmp_path / "o"), clamp_overflow=True)
    assert torch.all(load_dir(str(tmp_path / "o"))[NAME] == torch.finfo(torch.bfloat16).max)


def test_overflow_in_an_intermediate_step_and_in_python(big, tmp_path):
    """A step rounded to float16 and fed to the next step (rounded by the merge node), and a tensor
    handed to Python (rounded by the Emit node), follow the same rule."""
    plan = write_plan(tmp_path, f"""
        name: soup
        merge_method: linear
        models:
          - {{model: {big['x']}, parameters: {{weight: 1.0}}}}
          - {{model: {big['y']}, parameters: {{weight: 1.0}}}}
        parameters: {{normalize: false}}
        dtype: float16
        ---
        merge_method: linear
        models:
          - {{model: soup, parameters: {{weight: 0.5}}}}
          - {{model: {big['x']}, parameters: {{weight: 0.5}}}}
        dtype: float32
        """, "steps.yml")
    with pytest.raises(MergeError, match=f"tensor {NAME}: values up to 70000 overflow float16"):
        mergekit_lite.run(plan, str(tmp_path / "o"))
    stats = mergekit_lite.run(plan, str(tmp_path / "o"), clamp_overflow=True)
    assert stats.tensors == 39 and float(load_dir(str(tmp_path / "o"))[NAME].reshape(-1)[0]) == (65504 + 40000) / 2
    m = mergekit_lite.Model(big["x"]).linear([mergekit_lite.Model(big["y"])], weight=[1.0, 1.0], normalize=False)
    with pytest.raises(MergeError, match="overflow float16"):
        m.tensor(NAME, dtype="float16")
    assert float(m.tensor(NAME, dtype="float16", clamp_overflow=True).reshape(-1)[0]) == 65504


def test_nan_from_an_input_is_an_error_even_when_clamping(models, tmp_path):
    t = {k: v.copy() for k, v in models["tensors"]["a"].items()}
    t["model.norm.weight"] = t["model.norm.weight"].copy()
    t["model.norm.weight"][3] = np.nan
    path = save_model(str(tmp_path / "nan"), t, LLAMA_CONFIG)
    plan = write_plan(tmp_path, f"merge_method: passthrough\ndepth_upscale: {{model: {path}, copies: 2, drop: 1}}\n")
    with pytest.raises(MergeError, match="tensor model.norm.weight .*inf or NaN"):
        mergekit_lite.run(plan, str(tmp_path / "o"), clamp_overflow=True)  # clamping never hides a NaN
    assert not os.path.exists(tmp_path / "o")
