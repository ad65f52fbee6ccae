"""Layer stacking: slices, passthrough frankenmerges and depthwise upscaling, for any decoder."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import mergekit_lite
from mergekit_lite.errors import PlanError
from mergekit_lite.examples import GPT2_CONFIG, LLAMA_CONFIG, gpt2_shapes, random_model, save_model
from mergekit_lite.merge import compile_plan

from conftest import REPO, load_dir, write_plan


def llama_layer(name: str, k: int) -> str:
    parts = name.split(".")
    parts[2] = str(k)
    return ".".join(parts)


def test_frankenmerge_layers_are_renumbered_copies(models, tmp_path, out_dir):
    p, t = models["paths"], models["tensors"]
    plan = write_plan(tmp_path, f"""
        merge_method: passthrough
        slices:
          - sources:
              - model: {p['a']}
                layer_range: [0, 3]
          - sources:
              - model: {p['b']}
                layer_range: [1, 4]
          - sources:
              - model: {p['a']}
                layer_range: [3, 4]
        """)
    mergekit_lite.run(plan, out_dir)
    got = load_dir(out_dir)
    # independent expectation: output layer k <- (model, input layer)
    mapping = [("a", 0), ("a", 1), ("a", 2), ("b", 1), ("b", 2), ("b", 3), ("a", 3)]
    expected = {"model.embed_tokens.weight": t["a"]["model.embed_tokens.weight"],
                "model.norm.weight": t["a"]["model.norm.weight"], "lm_head.weight": t["a"]["lm_head.weight"]}
    layer_names = [n for n in t["a"] if n.startswith("model.layers.0.")]
    for k, (m, j) in enumerate(mapping):
        for n in layer_names:
            expected[llama_layer(n, k)] = t[m][llama_layer(n, j)]
    assert set(got) == set(expected)
    for name, value in expected.items():
        assert np.array_equal(got[name].numpy(), value), name
    cfg = json.load(open(os.path.join(out_dir, "config.json")))
    assert cfg["num_hidden_layers"] == 7


def test_gradient_restarts_in_every_slice(models, tmp_path, out_dir):
    p, t = models["paths"], models["tensors"]
    plan = write_plan(tmp_path, f"""
        merge_method: linear
        slices:
          - sources:
              - model: {p['a']}
                layer_range: [0, 3]
                parameters: {{weight: [0, 1]}}
              - model: {p['b']}
                layer_range: [0, 3]
                parameters: {{weight: 0}}
          - sources:
              - model: {p['a']}
                layer_range: [1, 3]
                parameters: {{weight: [0, 1]}}
              - model: {p['b']}
                layer_range: [1, 3]
                parameters: {{weight: 0}}
        parameters:
          normalize: false
        """)
    mergekit_lite.run(plan, out_dir)
    got = load_dir(out_dir)
    # slice 1 has 3 layers: t = 0, 0.5, 1; slice 2 has 2 layers: t = 0, 1 (restarting)
    for k, (j, w) in enumerate([(0, 0.0), (1, 0.5), (2, 1.0), (1, 0.0), (2, 1.0)]):
        name = f"model.layers.{k}.mlp.up_proj.weight"
        np.testing.assert_allclose(got[name].numpy(), w * t["a"][f"model.layers.{j}.mlp.up_proj.weight"],
                                   rtol=1e-6, atol=0)
    # embeddings and heads are planned at t = 0
    assert not got["model.embed_tokens.weight"].any() and not got["lm_head.weight"].any()


def test_passthrough_scale_filter_zeroes_projections(models, tmp_path, out_dir):
    p, t = models["paths"], models["tensors"]
    plan = write_plan(tmp_path, f"""
        merge_method: passthrough
        slices:
          - sources:
              - model: {p['base']}
                layer_range: [0, 4]
          - sources:
              - model: {p['base']}
                layer_range: [2, 4]
                parameters:
                  scale:
                    - filter: o_proj
                      value: 0
                    - filter: down_proj
                      value: 0.5
                    - value: 1
        """)
    mergekit_lite.run(plan, out_dir)
    got = load_dir(out_dir)
    assert not got["model.layers.4.self_attn.o_proj.weight"].any()
    np.testing.assert_allclose(got["model.layers.5.mlp.down_proj.weight"].numpy(),
                               0.5 * t["base"]["model.layers.3.mlp.down_proj.weight"], rtol=1e-7)
    assert np.array_equal(got["model.layers.5.mlp.up_proj.weight"].numpy(),
                          t["base"]["model.layers.3.mlp.up_proj.weight"])
    assert np.array_equal(got["model.layers.1.self_attn.o_proj.weight"].numpy(),
                          t["base"]["model.layers.1.self_attn.o_proj.weight"])


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt2")
    tensors = random_model(gpt2_shapes(GPT2_CONFIG), seed=3)
    cfg = dict(GPT2_CONFIG, layer_types=["full", "sliding", "full", "sliding"], sliding_window_per_layer=[0, 8, 0, 8])
    return save_model(str(root / "gpt2"), tensors, cfg), tensors


def test_gpt2_style_depth_upscale_with_tied_embeddings_and_per_layer_config(gpt2, tmp_path, out_dir):
    path, t = gpt2
    plan = write_plan(tmp_path, f"""
        depth_upscale:
          model: {path}
          copies: 2
          drop: 1
        """)
    mergekit_lite.run(plan, out_dir)
    got = load_dir(out_dir)
    mapping = [0, 1, 2, 1, 2, 3]  # SOLAR: [0, n-1) then [1, n)
    assert "lm_head.weight" not in got  # tied: no separate head
    assert np.array_equal(got["transformer.wte.weight"].numpy(), t["transformer.wte.weight"])
    assert np.array_equal(got["transformer.ln_f.bias"].numpy(), t["transformer.ln_f.bias"])
    for k, j in enumerate(mapping):
        for rest in ("attn.c_attn.weight", "mlp.c_proj.bias", "ln_2.weight"):
            assert np.array_equal(got[f"transformer.h.{k}.{rest}"].numpy(), t[f"transformer.h.{j}.{rest}"])
    assert len([n for n in got if n.startswith("transformer.h.")]) == 6 * 12
    cfg = json.load(open(os.path.join(out_dir, "config.json")))
    assert cfg["n_layer"] == 6 and "num_hidden_layers" not in cfg
    assert cfg["layer_types"] == ["full", "sliding", "full", "sliding", "full", "sliding"]
    assert cfg["sliding_window_per_layer"] == [0, 8, 0, 8, 0, 8]
    assert cfg["tie_word_embeddings"] is True


def test_per_layer_lists_follow_their_source_model(models, tmp_path, out_dir):
    root = tmp_path / "m"
    a = save_model(str(root / "a"), models["tensors"]["a"], dict(LLAMA_CONFIG, layer_types=["a0", "a1", "a2", "a3"]))
    b = save_model(str(root / "b"), models["tensors"]["b"], dict(LLAMA_CONFIG, layer_types=["b0", "b1", "b2", "b3"]))
    plan = write_plan(tmp_path, f"""
        merge_method: passthrough
        slices:
          - sources: [{{model: {a}, layer_range: [0, 2]}}]
          - sources: [{{model: {b}, layer_range: [1, 4]}}]
        """)
    mergekit_lite.run(plan, out_dir)
    cfg = json.load(open(os.path.join(out_dir, "config.json")))
    assert cfg["layer_types"] == ["a0", "a1", "b1", "b2", "b3"] and cfg["num_hidden_layers"] == 5


def test_explicit_embedding_and_head_donors(models, tmp_path, out_dir):
    p, t = models["paths"], models["tensors"]
    plan = write_plan(tmp_path, f"""
        merge_method: passthrough
        embed_source: {p['c']}
        head_source: {p['base']}
        slices:
          - sources: [{{model: {p['a']}, layer_range: [0, 2]}}]
          - sources: [{{model: {p['b']}, layer_range: [2, 4]}}]
        """)
    mergekit_lite.run(plan, out_dir)
    got = load_dir(out_dir)
    assert np.array_equal(got["model.embed_tokens.weight"].numpy(), t["c"]["model.embed_tokens.weight"])
    assert np.array_equal(got["lm_head.weight"].numpy(), t["base"]["lm_head.weight"])
    assert np.array_equal(got["model.norm.weight"].numpy(), t["base"]["model.norm.weight"])


def test_repeated_layer_is_read_per_output_tensor_not_held(models, tmp_path):
    p = models["paths"]
    plan = write_plan(tmp_path, f"""
        depth_upscale: {{model: {p['base']}, copies: 3, drop: 1}}
        """)
    compiled = compile_plan(plan)
    # every group is self-contained: no node is shared between two output tensors
    owners = {}
    for group, nodes in compiled.groups:
        for n in nodes:
            assert owners.setdefault(n, group) == group
    assert compiled.layout.config["num_hidden_layers"] == 3 + 2 + 3


def test_plan_shows_expanded_upscale():
    r = subprocess.run([sys.executable, "-m", "mergekit_lite", "plan", "merge_configs/solar_upscale.yml"],
                       capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0, r.stderr
    assert "expands to:" in r.stdout and "layer_range: [0, 3]" in r.stdout and "layer_range: [1, 4]" in r.stdout
    assert "output tensors: 57" in r.stdout


# -- errors -----------------------------------------------------------------------------------------

def run_error(tmp_path, text):
    with pytest.raises(mergekit_lite.MergeError) as info:
        mergekit_lite.run(write_plan(tmp_path, text), str(tmp_path / "out"))
    assert not (tmp_path / "out").exists()
    return str(info.value)


def test_layer_range_outside_model(models, tmp_path):
    msg = run_error(tmp_path, f"""
        merge_method: passthrough
        slices:
          - sources: [{{model: {models['paths']['a']}, layer_range: [2, 9]}}]
        """)
    assert "layer_range [2, 9] is outside" in msg and "4 layers" in msg and "plan.yml:4" in msg


def test_mixed_architectures_are_refused(models, gpt2, tmp_path):
    msg = run_error(tmp_path, f"""
        merge_method: passthrough
        slices:
          - sources: [{{model: {models['paths']['a']}, layer_range: [0, 2]}}]
          - sources: [{{model: {gpt2[0]}, layer_range: [0, 2]}}]
        """)
    assert "different architectures" in msg and "llama" in msg and "gpt2" in msg


def test_unequal_slice_sources_and_bad_upscale(models, tmp_path):
    p = models["paths"]
    msg = run_error(tmp_path, f"""
        merge_method: linear
        slices:
          - sources:
              - {{model: {p['a']}, layer_range: [0, 2], parameters: {{weight: 1}}}}
              - {{model: {p['b']}, layer_range: [0, 3], parameters: {{weight: 1}}}}
        """)
    assert "same number of layers" in msg
    msg = run_error(tmp_path, f"depth_upscale: {{model: {p['a']}, copies: 2, drop: 4}}\n")
    assert "drop 4 leaves no layers" in msg
    msg = run_error(tmp_path, f"merge_method: task_arithmetic\ndepth_upscale: {{model: {p['a']}}}\n")
    assert "needs merge_method: passthrough" in msg


def test_donor_keys_only_for_slices(models, tmp_path):
    p = models["paths"]
    with pytest.raises(PlanError, match="embed_source applies to slices plans"):
        mergekit_lite.run(write_plan(tmp_path, f"""
            merge_method: linear
            embed_source: {p['a']}
            models:
              - {{model: {p['a']}, parameters: {{weight: 1}}}}
            """), str(tmp_path / "o"))


def test_upscaled_example_loads_in_transformers(tmp_path):
    transformers = pytest.importorskip("transformers")
    out = tmp_path / "up"
    mergekit_lite.run(os.path.join(REPO, "merge_configs", "solar_upscale.yml"), str(out))
    model = transformers.AutoModelForCausalLM.from_pretrained(str(out))
    assert model.config.num_hidden_layers == 6
    with torch.no_grad():
        logits = model(torch.tensor([[1, 5, 7, 9]])).logits
    assert logits.shape == (1, 4, 256) and torch.isfinite(logits).all()
