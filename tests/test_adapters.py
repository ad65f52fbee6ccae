"""PEFT adapters as inputs: reading adapter folders, the plan forms of ``base+adapter``, and folding,
checked against W + scaling·B@A (and IA3 row/column scaling) computed in numpy float64."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import mergekit_lite
from mergekit_lite import Model
from mergekit_lite.errors import ModelNotFound, PlanError
from mergekit_lite.example_adapters import IA3_DEFAULTS, LORA_DEFAULTS, lora_tensors, save_adapter
from mergekit_lite.examples import GPT2_CONFIG, LLAMA_CONFIG, gpt2_shapes, llama_shapes, random_model, save_model
from mergekit_lite.io.adapters import open_adapter

from conftest import REPO, load_dir, write_plan

CONFIGS = os.path.join(REPO, "merge_configs")
BASE = os.path.join(CONFIGS, "models", "base")
ADAPTERS = os.path.join(CONFIGS, "adapters")
LLAMA = llama_shapes(LLAMA_CONFIG)


def f64(t) -> np.ndarray:
    return (t.float() if isinstance(t, torch.Tensor) else torch.as_tensor(t)).double().numpy()


def rel(a, b) -> float:
    a, b = f64(a), f64(b)
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))


def lora_reference(base: dict, folder: str, scalings: dict[str, float], transpose: bool = False) -> dict:
    """W + s·B@A in float64 for every module of the adapter (s given per module by the test)."""
    ad = load_file(os.path.join(folder, "adapter_model.safetensors"))
    out = {}
    for key in ad:
        if ".lora_A" not in key and "lora_embedding_A" not in key:
            continue
        module = key.removeprefix("base_model.model.").split(".lora_")[0]
        a, b = f64(ad[key]), f64(ad[key.replace("_A", "_B")])
        delta = scalings[module] * (b @ a)
        emb = "lora_embedding" in key
        out[module + ".weight"] = f64(base[module + ".weight"]) + (delta.T if transpose or emb else delta)
    return out


def fold(tmp_path, model: str, dtype: str = "float32") -> dict:
    plan = write_plan(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {model}\ndtype: {dtype}\n",
                      name="fold.yml")
    out = str(tmp_path / "folded")
    mergekit_lite.run(plan, out, overwrite=True)
    return load_dir(out)


# -- reading -----------------------------------------------------------------------------------

def test_example_adapters_are_read_with_their_ranks_and_scalings():
    attn = open_adapter(os.path.join(ADAPTERS, "lora_attn"))
    q = attn.modules["model.layers.1.self_attn.q_proj.weight"]
    o = attn.modules["model.layers.1.self_attn.o_proj.weight"]
    assert (q.rank, q.scaling, o.rank, o.scaling) == (8, 16 / 8, 4, 8 / 4)  # rank_pattern / alpha_pattern
    mlp = open_adapter(os.path.join(ADAPTERS, "lora_mlp"))
    assert mlp.modules["model.layers.0.mlp.up_proj.weight"].scaling == pytest.approx(8 / 2)  # rsLoRA: α/√r
    ia3 = open_adapter(os.path.join(ADAPTERS, "ia3"))
    assert ia3.modules["model.layers.0.mlp.down_proj.weight"].feedforward
    assert not ia3.modules["model.layers.0.self_attn.k_proj.weight"].feedforward


def test_keys_with_the_adapter_name_map_to_the_same_base_tensors(tmp_path):
    ts = lora_tensors(LLAMA, ["q_proj"], {"*": 2}, 1)
    named = {k.replace(".lora_A.", ".lora_A.default.").replace(".lora_B.", ".lora_B.default."): v
             for k, v in ts.items()}
    plain = open_adapter(save_adapter(str(tmp_path / "plain"), dict(LORA_DEFAULTS, r=2, lora_alpha=4), ts))
    withname = open_adapter(save_adapter(str(tmp_path / "named"), dict(LORA_DEFAULTS, r=2, lora_alpha=4), named))
    expected = {f"model.layers.{i}.self_attn.q_proj.weight" for i in range(4)}
    assert set(plain.modules) == set(withname.modules) == expected


@pytest.mark.parametrize("change, message", [
    ({"use_dora": True}, "DoRA adapters are not supported"),
    ({"peft_type": "LOHA"}, "LoHa adapters are not supported"),
    ({"peft_type": "LOKR"}, "LoKr adapters are not supported"),
    ({"bias": "all"}, "adapters that train biases are not supported (bias: all)"),
    ({"lora_bias": True}, "LoRA with a bias on lora_B is not supported"),
    ({"init_lora_weights": "pissa_niter_4"}, "pissa_niter_4 adapters are stored relative to a modified base"),
    ({"target_parameters": ["experts"]}, "LoRA on parameters (target_parameters) is not supported"),
])
def test_refused_variants_give_their_messages(tmp_path, change, message):
    folder = save_adapter(str(tmp_path / "ad"), dict(LORA_DEFAULTS, r=2, lora_alpha=4, **change),
                          lora_tensors(LLAMA, ["q_proj"], {"*": 2}, 1))
    plan = write_plan(tmp_path, f"merge_method: passthrough\nmodels:\n  - model: {BASE}+{folder}\n")
    with pytest.raises(ModelNotFound) as info:
        mergekit_lite.run(plan, str(tmp_path / "out"))
    assert message in str(info.value) and folder in str(info.value)
    assert not (tmp_path / "out").exists()


def test_dora_tensors_are_refused_even_without_the_config_flag(tmp_path):
    ts = lora_tensors(LLAMA, ["q_proj"], {"*": 2}, 1)
    ts["model.layers.0.self_attn.q_proj.lora_magnitude_vector"] = np.ones(64, np.float32)
    folder = save_adapter(str(tmp_path / "ad"), dict(LORA_DEFAULTS, r=2, lora_alpha=4), ts)
    with pytest.raises(ModelNotFound, match="DoRA adapters are not supported"):
        open_adapter(folder)


def test_an_adapter_given_as_a_model_says_how_to_use_it(tmp_path):
    folder = os.path.join(ADAPTERS, "lora_attn")
    plan = write_plan(tmp_path, f"merge_method: linear\nmodels:\n  - model: {BASE}\n  - model: {folder}\n")
    r = subprocess.run([sys.executable, "-m", "mergekit_lite", "run", plan, str(tmp_path / "out")],
                       capture_output=True, text=True)
    assert r.returncode == 2 and "Traceback" not in r.stderr
    assert "is a PEFT adapter" in r.stderr and f"BASE+{folder}" in r.stderr and "output: adapter" in r.stderr
    with pytest.raises(ModelNotFound, match="is a PEFT adapter"):
        Model(folder).linear([Model(BASE)])


def test_a_module_the_base_lacks_or_a_shape_that_disagrees_is_a_plan_error_naming_both(tmp_path):
    ts = lora_tensors(LLAMA, ["q_proj", "k_proj"], {"*": 2}, 1)
    ts["model.layers.9.self_attn.q_proj.lora_A.weight"] = np.zeros((2, 64), np.float32)
    ts["model.layers.9.self_attn.q_proj.lora_B.weight"] = np.zeros((64, 2), np.float32)
    ts["model.layers.0.self_attn.k_proj.lora_B.weight"] = np.zeros((48, 2), np.float32)  # k_proj is [32, 64]
    folder = save_adapter(str(tmp_path / "ad"), dict(LORA_DEFAULTS, r=2, lora_alpha=4), ts)
    plan = write_plan(tmp_path, f"merge_method: linear\nmodels:\n  - model: {BASE}\n    parameters: {{weight: 1}}\n"
                                f"  - model: {BASE}+{folder}\n    parameters: {{weight: 1}}\n")
    with pytest.raises(PlanError) as info:
        mergekit_lite.compile_plan(plan)
    text = str(info.value)
    assert "plan.yml:5: models[1].model:" in text
    assert f"adapter '{folder}' adapts module model.layers.9.self_attn.q_proj, but model '{BASE}' has no tensor " \
           "model.layers.9.self_attn.q_proj.weight" in text
    assert "module model.layers.0.self_attn.k_proj (lora_A [2, 64], lora_B [48, 2]) does not fit model " \
           f"'{BASE}''s model.layers.0.self_attn.k_proj.weight [32, 64]" in text


# -- plan forms --------------------------------------------------------------------------------

def test_the_three_forms_of_an_adapter_input_give_the_same_bits(tmp_path):
    folder = os.path.join(ADAPTERS, "lora_attn")
    forms = [f"{BASE}+{folder}", f"{{base: {BASE}, adapter: {folder}}}", f"{{model: {{path: {BASE}}}, lora: {folder}}}"]
    results = [fold(tmp_path, form) for form in forms]
    for other in results[1:]:
        assert all(torch.equal(results[0][k], other[k]) for k in results[0])


# -- folding -----------------------------------------------------------------------------------

def test_lora_fold_equals_w_plus_scaled_ba_with_rank_and_alpha_patterns(tmp_path):
    base = load_dir(BASE)
    folder = os.path.join(ADAPTERS, "lora_attn")
    got = fold(tmp_path, f"{BASE}+{folder}")
    scalings = {n.removesuffix(".weight"): (2.0 if "o_proj" not in n else 8 / 4) for n in LLAMA}
    want = lora_reference(base, folder, scalings)
    assert len(want) == 16
    for name, ref in want.items():
        assert rel(got[name], ref) < 1e-6, name
    for name in set(base) - set(want):
        assert torch.equal(got[name], base[name]), name  # untouched tensors: the base's bits


def test_rslora_scaling_is_alpha_over_root_r(tmp_path):
    base = load_dir(BASE)
    folder = os.path.join(ADAPTERS, "lora_mlp")
    got = fold(tmp_path, f"{BASE}+{folder}")
    want = lora_reference(base, folder, {n.removesuffix(".weight"): 8 / 4 ** 0.5 for n in LLAMA})
    assert all(rel(got[n], w) < 1e-6 for n, w in want.items())


def test_fold_into_bfloat16_rounds_once_like_merge_and_unload(tmp_path):
    base = {k: v.to(torch.bfloat16) for k, v in load_dir(BASE).items()}
    bf16 = save_model(str(tmp_path / "bf16"), base, dict(LLAMA_CONFIG, torch_dtype="bfloat16"))
    folder = os.path.join(ADAPTERS, "lora_attn")
    got = fold(tmp_path, f"{bf16}+{folder}", dtype="bfloat16")
    want = lora_reference(base, folder, {n.removesuffix(".weight"): (2.0 if "o_proj" not in n else 2.0)
                                         for n in LLAMA})
    for name, ref in want.items():
        assert got[name].dtype == torch.bfloat16
        ulp = np.abs(f64(torch.from_numpy(ref).to(torch.bfloat16)) - ref)
        assert np.all(np.abs(f64(got[name]) - ref) <= ulp + 1e-12)  # the nearest bfloat16 of the exact sum


def _gpt2(tmp_path):
    shapes = gpt2_shapes(GPT2_CONFIG)
    tensors = random_model(shapes, seed=3)
    return save_model(str(tmp_path / "gpt2"), tensors, GPT2_CONFIG), tensors, shapes


def test_fan_in_fan_out_conv1d_embedding_lora_and_modules_to_save(tmp_path):
    """GPT-2: Conv1D weights are [in, out], so ΔW = (B@A)ᵀ (c_attn is not square, c_proj is: the
    config's fan_in_fan_out decides); an embedding LoRA's ΔW is (B@A)ᵀ; ln_f is replaced whole."""
    path, base, shapes = _gpt2(tmp_path)
    rng = np.random.default_rng(0)
    ts = {}
    for n in range(4):
        for mod, (i, o) in {"attn.c_attn": (32, 96), "attn.c_proj": (32, 32)}.items():
            m = f"transformer.h.{n}.{mod}"
            ts[m + ".lora_A.weight"] = rng.normal(0, 0.2, (3, i)).astype(np.float32)
            ts[m + ".lora_B.weight"] = rng.normal(0, 0.02, (o, 3)).astype(np.float32)
    ts["transformer.wte.lora_embedding_A"] = rng.normal(0, 0.2, (3, 256)).astype(np.float32)
    ts["transformer.wte.lora_embedding_B"] = rng.normal(0, 0.02, (32, 3)).astype(np.float32)
    ts["transformer.ln_f.weight"] = rng.normal(1, 0.1, (32,)).astype(np.float32)
    folder = save_adapter(str(tmp_path / "ad"), dict(LORA_DEFAULTS, r=3, lora_alpha=6, fan_in_fan_out=True,
                                                    modules_to_save=["ln_f"]), ts)
    got = fold(tmp_path, f"{path}+{folder}")
    want = lora_reference({k: torch.from_numpy(v) for k, v in base.items()}, folder,
                          {n.removesuffix(".weight"): 2.0 for n in shapes}, transpose=True)
    assert len(want) == 9
    for name, ref in want.items():
        assert rel(got[name], ref) < 1e-6, name
    assert np.array_equal(f64(got["transformer.ln_f.weight"]), ts["transformer.ln_f.weight"].astype(np.float64))


def test_ia3_scales_rows_or_columns_and_the_biases_of_output_scaled_modules(tmp_path):
    path, base, shapes = _gpt2(tmp_path)
    base = {k: v + 0.1 for k, v in base.items()}  # non-zero biases
    path = save_model(path, base, GPT2_CONFIG)
    # Conv1D weights are [in, out]: an output-scaled module's [out, 1] vector scales columns, an
    # input-scaled ("feedforward") module's [1, in] vector scales rows (fan_in_fan_out transposes)
    rng = np.random.default_rng(5)
    vec = {}
    for n in range(4):
        vec[f"transformer.h.{n}.attn.c_attn.ia3_l"] = rng.normal(1, 0.05, (96, 1)).astype(np.float32)
        vec[f"transformer.h.{n}.mlp.c_fc.ia3_l"] = rng.normal(1, 0.05, (1, 32)).astype(np.float32)
    folder = save_adapter(str(tmp_path / "ia3"), dict(IA3_DEFAULTS, target_modules=["c_attn", "c_fc"],
                                                     feedforward_modules=["c_fc"], fan_in_fan_out=True), vec)
    got = fold(tmp_path, f"{path}+{folder}")
    for n in range(4):
        attn, fc = f"transformer.h.{n}.attn.c_attn", f"transformer.h.{n}.mlp.c_fc"
        l_attn, l_fc = vec[attn + ".ia3_l"].astype(np.float64), vec[fc + ".ia3_l"].astype(np.float64)
        assert l_attn.shape == (96, 1) and l_fc.shape == (1, 32)
        assert rel(got[attn + ".weight"], base[attn + ".weight"] * l_attn[:, 0][None, :]) < 1e-6
        assert rel(got[attn + ".bias"], base[attn + ".bias"] * l_attn[:, 0]) < 1e-6
        assert rel(got[fc + ".weight"], base[fc + ".weight"] * l_fc[0][:, None]) < 1e-6
        assert np.array_equal(f64(got[fc + ".bias"]), f64(torch.from_numpy(base[fc + ".bias"])))


def test_ia3_on_llama_scales_output_rows_and_down_proj_input_columns(tmp_path):
    base = load_dir(BASE)
    got = fold(tmp_path, f"{BASE}+{os.path.join(ADAPTERS, 'ia3')}")
    vec = load_file(os.path.join(ADAPTERS, "ia3", "adapter_model.safetensors"))
    k, d = "model.layers.2.self_attn.k_proj", "model.layers.2.mlp.down_proj"
    assert rel(got[k + ".weight"], f64(base[k + ".weight"]) * f64(vec[f"base_model.model.{k}.ia3_l"])) < 1e-7
    assert rel(got[d + ".weight"], f64(base[d + ".weight"]) * f64(vec[f"base_model.model.{d}.ia3_l"])) < 1e-7
    assert torch.equal(got["model.layers.2.self_attn.q_proj.weight"], base["model.layers.2.self_attn.q_proj.weight"])


def test_an_adapter_applies_to_an_earlier_step_of_the_plan(tmp_path):
    folder = os.path.join(ADAPTERS, "lora_attn")
    plan = write_plan(tmp_path, f"""
        name: soup
        merge_method: linear
        models:
          - {{model: {CONFIGS}/models/ft_math, parameters: {{weight: 0.5}}}}
          - {{model: {CONFIGS}/models/ft_code, parameters: {{weight: 0.5}}}}
        out_dtype: float32
        ---
        merge_method: passthrough
        models:
          - model: soup+{folder}
        """)
    mergekit_lite.run(plan, str(tmp_path / "out"))
    got = load_dir(str(tmp_path / "out"))
    soup = {k: (f64(a) + f64(b)) / 2 for (k, a), b in zip(load_dir(f"{CONFIGS}/models/ft_math").items(),
                                                          load_dir(f"{CONFIGS}/models/ft_code").values())}
    want = lora_reference({k: torch.from_numpy(v) for k, v in soup.items()}, folder,
                          {n.removesuffix(".weight"): 2.0 for n in LLAMA})
    assert all(rel(got[n], w) < 1e-6 for n, w in want.items())
    assert (tmp_path / "out" / "tokenizer.json").exists()  # the tokenizer follows the step back to its models


def test_python_with_adapter_is_the_plan_form_and_a_task_vector(tmp_path):
    base = Model(BASE)
    tuned = base.with_adapter(os.path.join(ADAPTERS, "lora_attn"))
    assert f"model: {BASE}+{ADAPTERS}/lora_attn" in tuned.to_plan()
    merged = base + 0.5 * (tuned - base)
    name = "model.layers.1.self_attn.q_proj.weight"
    want = lora_reference(load_dir(BASE), os.path.join(ADAPTERS, "lora_attn"),
                          {n.removesuffix(".weight"): 1.0 for n in LLAMA})
    assert rel(merged.tensor(name), want[name]) < 1e-6  # half the delta: scaling 2 · 0.5
    with pytest.raises(TypeError, match="already has an adapter"):
        tuned.with_adapter(os.path.join(ADAPTERS, "lora_mlp"))


def test_no_merged_copy_is_written(tmp_path, monkeypatch):
    """The fold happens per tensor in memory: the only folder written is the output."""
    monkeypatch.chdir(tmp_path)
    plan = os.path.join(CONFIGS, "lora_task_arithmetic.yml")
    before = set(os.listdir(tmp_path))
    mergekit_lite.run(plan, "out")
    assert set(os.listdir(tmp_path)) - before == {"out"}
    assert sorted(os.listdir("out")) == ["README.md", "config.json", "mergekit_config.yml", "model.safetensors",
                                         "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert json.load(open("out/config.json"))["torch_dtype"] == "bfloat16"
