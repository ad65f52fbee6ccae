"""The engine end to end: dtypes, sharding, atomic output, memory budget and errors for bad input."""

import json
import os

import numpy as np
import pytest
import torch

import mergekit_lite
from mergekit_lite.errors import (BudgetExceeded, ModelNotFound, OutputExists, ShapeMismatch, TensorNotFound,
                                  UnsafeOutput)
from mergekit_lite.examples import LLAMA_CONFIG, save_model
from mergekit_lite.executor import Executor
from mergekit_lite.graph import Load, Merge, describe
from mergekit_lite.merge import compile_plan

from conftest import load_dir, write_plan


def ta_plan(tmp_path, p, extra="", name="plan.yml"):
    return write_plan(tmp_path, f"""
        merge_method: task_arithmetic
        base_model: {p['base']}
        models:
          - model: {p['a']}
            parameters: {{weight: 0.7}}
          - model: {p['b']}
            parameters: {{weight: 0.5}}
        {extra}
        """, name)


def test_bfloat16_output_is_the_float32_result_rounded_once(models, tmp_path):
    p = models["paths"]
    f32 = str(tmp_path / "f32")
    bf16 = str(tmp_path / "bf16")
    mergekit_lite.run(ta_plan(tmp_path, p, "dtype: float32", "a.yml"), f32)
    mergekit_lite.run(ta_plan(tmp_path, p, "out_dtype: bfloat16", "b.yml"), bf16)
    a, b = load_dir(f32), load_dir(bf16)
    for name in a:
        assert b[name].dtype == torch.bfloat16
        assert torch.equal(b[name], a[name].to(torch.bfloat16)), name
    cfg = json.load(open(os.path.join(bf16, "config.json")))
    assert cfg["torch_dtype"] == "bfloat16" and cfg["num_hidden_layers"] == LLAMA_CONFIG["num_hidden_layers"]


def test_sharded_output_equals_in_memory_result(models, tmp_path, out_dir):
    p = models["paths"]
    plan = ta_plan(tmp_path, p)
    stats = mergekit_lite.run(plan, out_dir, max_shard_size="100KB")
    files = sorted(os.listdir(out_dir))
    shards = [f for f in files if f.endswith(".safetensors")]
    assert len(shards) > 3 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    index = json.load(open(os.path.join(out_dir, "model.safetensors.index.json")))
    on_disk = load_dir(out_dir)
    assert set(index["weight_map"]) == set(on_disk) and stats.tensors == len(on_disk)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in on_disk.values())
    for shard in shards:
        assert os.path.getsize(os.path.join(out_dir, shard)) < 100_000 + 20_000  # data + header
    compiled = compile_plan(plan, sink="emit")
    in_memory = dict(Executor(compiled, device="cpu").run())
    assert list(in_memory) == [n for n in in_memory]  # ordered output
    assert set(in_memory) == set(on_disk)
    for name, value in in_memory.items():
        assert torch.equal(value, on_disk[name]), name
    # tokenizer, config and the card come along
    for f in ("config.json", "tokenizer.json", "tokenizer_config.json", "README.md", "mergekit_config.yml"):
        assert f in files
    assert "merge_method: task_arithmetic" in open(os.path.join(out_dir, "README.md")).read()


def test_single_shard_output_has_no_index(models, tmp_path, out_dir):
    mergekit_lite.run(ta_plan(tmp_path, models["paths"]), out_dir)
    assert "model.safetensors" in os.listdir(out_dir)
    assert "model.safetensors.index.json" not in os.listdir(out_dir)


def test_peak_live_bytes_stay_under_budget(models, tmp_path, out_dir):
    plan = ta_plan(tmp_path, models["paths"])
    compiled = compile_plan(plan)
    need = compiled.max_need
    # biggest tensor: 256x64 float32 embeddings; 3 inputs + float32 workspace + result
    assert need >= 3 * 256 * 64 * 4
    budget = need + 1000
    stats = mergekit_lite.run(plan, out_dir, max_memory=budget)
    assert 0 < stats.peak_live_bytes <= budget
    assert stats.peak_reserved_bytes <= budget
    # a generous budget reads ahead: more is alive at once, still under the budget
    stats2 = mergekit_lite.run(plan, out_dir + "2", max_memory=50 * need)
    assert need < stats2.peak_reserved_bytes <= 50 * need


def test_budget_too_small_fails_before_any_io(models, tmp_path, out_dir):
    with pytest.raises(BudgetExceeded, match="too small.*needs"):
        mergekit_lite.run(ta_plan(tmp_path, models["paths"]), out_dir, max_memory="10KB")
    assert not os.path.exists(out_dir)


def test_plan_description_counts(models, tmp_path):
    compiled = compile_plan(ta_plan(tmp_path, models["paths"]))
    info = describe(compiled)
    n = len(models["tensors"]["base"])
    assert info["output_tensors"] == n and info["merges"] == n
    assert info["loads"] == 3 * n and info["max_inputs_per_tensor"] == 3
    assert info["bytes_written"] == sum(v.nbytes for v in models["tensors"]["base"].values())
    assert info["bytes_read"] == 3 * info["bytes_written"]


def test_shared_loads_are_deduplicated_within_a_tensor(models, tmp_path):
    compiled = compile_plan(ta_plan(tmp_path, models["paths"]))
    g = compiled.graph
    merges = [n for n in g if isinstance(n, Merge)]
    assert all(isinstance(d, Load) for m in merges for d in g.predecessors(m))
    assert all(g.in_degree(m) == 3 for m in merges)


# -- bad input ------------------------------------------------------------------------------------

def test_existing_output_is_refused_and_untouched(models, tmp_path, out_dir):
    os.makedirs(out_dir)
    open(os.path.join(out_dir, "keep.txt"), "w").write("mine")
    with pytest.raises(OutputExists, match="already exists.*--overwrite"):
        mergekit_lite.run(ta_plan(tmp_path, models["paths"]), out_dir)
    assert os.listdir(out_dir) == ["keep.txt"]
    # issue 13: --overwrite replaces only folders mergekit-lite wrote; another folder needs force_overwrite
    with pytest.raises(UnsafeOutput, match="not written by mergekit-lite.*--force-overwrite"):
        mergekit_lite.run(ta_plan(tmp_path, models["paths"]), out_dir, overwrite=True)
    assert os.listdir(out_dir) == ["keep.txt"]
    mergekit_lite.run(ta_plan(tmp_path, models["paths"]), out_dir, force_overwrite=True)
    assert "keep.txt" not in os.listdir(out_dir) and "model.safetensors" in os.listdir(out_dir)


def test_missing_model_path(models, tmp_path, out_dir):
    p = dict(models["paths"], b=str(tmp_path / "no-such-model"))
    with pytest.raises(ModelNotFound, match="no-such-model.*not found"):
        mergekit_lite.run(ta_plan(tmp_path, p), out_dir)
    assert not os.path.exists(out_dir)


def test_missing_tensor_names_tensor_and_model(models, tmp_path, out_dir):
    t = dict(models["tensors"]["a"])
    del t["model.layers.2.mlp.up_proj.weight"]
    broken = save_model(str(tmp_path / "broken"), t, LLAMA_CONFIG)
    p = dict(models["paths"], a=broken)
    with pytest.raises(TensorNotFound) as info:
        mergekit_lite.run(ta_plan(tmp_path, p), out_dir)
    msg = str(info.value)
    assert "model.layers.2.mlp.up_proj.weight" in msg and "broken" in msg
    assert not os.path.exists(out_dir)


def test_shape_mismatch_names_tensor_models_and_shapes(models, tmp_path, out_dir):
    t = dict(models["tensors"]["b"])
    t["model.layers.1.self_attn.q_proj.weight"] = np.zeros((32, 64), np.float32)
    broken = save_model(str(tmp_path / "wide"), t, LLAMA_CONFIG)
    p = dict(models["paths"], b=broken)
    with pytest.raises(ShapeMismatch) as info:
        mergekit_lite.run(ta_plan(tmp_path, p), out_dir)
    msg = str(info.value)
    assert "model.layers.1.self_attn.q_proj.weight" in msg and "[32, 64]" in msg and "[64, 64]" in msg
    assert "wide" in msg


def test_failure_mid_run_leaves_nothing(models, tmp_path, out_dir):
    t = dict(models["tensors"]["a"])
    t["model.layers.3.mlp.down_proj.weight"] = np.full((64, 176), np.inf, np.float32)
    broken = save_model(str(tmp_path / "inf"), t, LLAMA_CONFIG)
    p = dict(models["paths"], a=broken)
    with pytest.raises(mergekit_lite.MergeError, match="model.layers.3.mlp.down_proj.weight.*inf or NaN"):
        mergekit_lite.run(ta_plan(tmp_path, p), out_dir)
    assert not os.path.exists(out_dir)
    assert not [f for f in os.listdir(tmp_path) if f.startswith(".out")]


def test_tied_embeddings_supply_a_missing_lm_head(models, tmp_path, out_dir):
    t = dict(models["tensors"]["b"])
    del t["lm_head.weight"]
    tied = save_model(str(tmp_path / "tied"), t, dict(LLAMA_CONFIG, tie_word_embeddings=True))
    p = dict(models["paths"], b=tied)
    mergekit_lite.run(ta_plan(tmp_path, p, "dtype: float32"), out_dir)
    got = load_dir(out_dir)["lm_head.weight"].double().numpy()
    base = models["tensors"]["base"]["lm_head.weight"].astype(np.float64)
    expected = base + 0.7 * (models["tensors"]["a"]["lm_head.weight"] - base) + 0.5 * (
        models["tensors"]["b"]["model.embed_tokens.weight"] - base)
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-7)


def test_integer_buffers_are_copied_not_merged(models, tmp_path, out_dir):
    paths = {}
    for key in ("base", "a", "b"):
        t = dict(models["tensors"][key])
        t["model.rotary_emb.position_ids"] = np.arange(8, dtype=np.int64) + (key == "a")
        paths[key] = save_model(str(tmp_path / f"buf_{key}"), t, LLAMA_CONFIG)
    mergekit_lite.run(ta_plan(tmp_path, paths), out_dir)
    got = load_dir(out_dir)["model.rotary_emb.position_ids"]
    assert got.dtype == torch.int64 and got.tolist() == list(range(8))


def test_single_safetensors_file_as_model(models, tmp_path, out_dir):
    single = save_model(str(tmp_path / "single"), models["tensors"]["a"], LLAMA_CONFIG)
    p = dict(models["paths"], a=os.path.join(single, "model.safetensors"))
    mergekit_lite.run(ta_plan(tmp_path, p, "dtype: float32"), out_dir)
    reference = str(tmp_path / "ref")
    mergekit_lite.run(ta_plan(tmp_path, models["paths"], "dtype: float32", "r.yml"), reference)
    a, b = load_dir(out_dir), load_dir(reference)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_hub_repo_id_offline_without_cache_is_a_clear_error(models, tmp_path, out_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    from mergekit_lite.io import resolve

    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True, raising=False)
    p = dict(models["paths"], b="someorg/some-model")
    with pytest.raises(ModelNotFound, match="someorg/some-model"):
        mergekit_lite.run(ta_plan(tmp_path, p), out_dir)
    assert resolve.looks_like_repo_id("org/name") and not resolve.looks_like_repo_id("./org/name")


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_merge_matches_cpu(models, tmp_path):
    plan = ta_plan(tmp_path, models["paths"], "dtype: float32")
    mergekit_lite.run(plan, str(tmp_path / "cpu"), device="cpu")
    stats = mergekit_lite.run(plan, str(tmp_path / "cuda"), device="cuda")
    assert stats.device.startswith("cuda")
    a, b = load_dir(str(tmp_path / "cpu")), load_dir(str(tmp_path / "cuda"))
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=1e-6, atol=1e-7)
