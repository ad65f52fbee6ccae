"""Row-block streaming: a tensor merged in blocks of rows (and each block in tiles) gives the bits it
gives merged whole; its statistics are gathered in sweeps first; the writer places row blocks; the
buffer pool reuses only buffers nothing refers to; whole-model TIES is the paper's global top-k."""

from __future__ import annotations

import glob
import json
import os

import numpy as np
import pytest
import torch

import mergekit_lite
from mergekit_lite import blocks, tiles
from mergekit_lite.buffers import BufferPool
from mergekit_lite.errors import MergeError
from mergekit_lite.graph import describe
from mergekit_lite.io.writer import PlannedTensor, ShardedWriter, ShardLayout
from mergekit_lite.merge import Options, compile_plan

from conftest import REPO, load_dir, write_plan
from test_output_pins import PINS, folder_digest

CONFIGS = os.path.join(REPO, "merge_configs")
SMALL_BLOCKS = 4 * 3000  # bytes of float32: the 256x64 embeddings stream in 6 blocks, the MLPs in 2


@pytest.mark.parametrize("plan", sorted(os.path.basename(p) for p in glob.glob(os.path.join(CONFIGS, "*.yml"))))
def test_streamed_output_has_the_pinned_bits(plan, tmp_path):
    """Every example plan, its large tensors cut into row blocks (statistics gathered in sweeps),
    writes the bytes pinned for the whole-tensor engine."""
    out = str(tmp_path / "out")
    mergekit_lite.run(os.path.join(CONFIGS, plan), out, block_size=SMALL_BLOCKS)
    assert folder_digest(out) == json.load(open(PINS))[plan]


@pytest.mark.parametrize("plan", ["linear.yml", "ties.yml", "slerp.yml", "multistep.yml", "frankenmerge.yml",
                                  "lora_fold.yml", "lora_task_arithmetic.yml"])
def test_separable_plans_do_stream(plan):
    info = describe(compile_plan(os.path.join(CONFIGS, plan), Options(block_size=SMALL_BLOCKS)))
    assert info["blocks"] > info["output_tensors"]


def test_statistics_are_swept_before_blocks_are_merged():
    compiled = compile_plan(os.path.join(CONFIGS, "ties.yml"), Options(block_size=SMALL_BLOCKS))
    names = [g for g, _ in compiled.groups]
    first_embed = names.index("model.embed_tokens.weight#0.0.0")  # sweep 0, block 0
    merged = names.index("model.embed_tokens.weight#0")
    assert first_embed < names.index("model.embed_tokens.weight#0.1.0") < merged
    assert describe(compiled)["statistic_sweeps"] > 0
    whole = compile_plan(os.path.join(CONFIGS, "ties.yml"), Options())
    assert describe(whole)["statistic_sweeps"] == 0 and describe(whole)["blocks"] == describe(whole)["output_tensors"]


def test_block_size_bounds_the_planned_peak():
    big = compile_plan(os.path.join(CONFIGS, "linear.yml"), Options())
    small = compile_plan(os.path.join(CONFIGS, "linear.yml"), Options(block_size=SMALL_BLOCKS))
    assert small.max_need < big.max_need / 2


def test_block_size_errors():
    with pytest.raises(MergeError, match="--block-size"):
        Options(block_size="lots").block_numel()
    with pytest.raises(MergeError, match="at least one float32"):
        Options(block_size=2).block_numel()


def test_cli_and_api_take_block_size(tmp_path):
    from mergekit_lite import Model
    from mergekit_lite.cli import main

    plan = os.path.join(CONFIGS, "task_arithmetic.yml")
    assert main(["run", plan, str(tmp_path / "cli"), "--block-size", str(SMALL_BLOCKS), "-q"]) == 0
    assert folder_digest(str(tmp_path / "cli")) == json.load(open(PINS))["task_arithmetic.yml"]
    base = Model(os.path.join(CONFIGS, "models", "base"))
    math = Model(os.path.join(CONFIGS, "models", "ft_math")) - base
    (base + 0.5 * math).save(str(tmp_path / "api"), block_size=SMALL_BLOCKS)
    (base + 0.5 * math).save(str(tmp_path / "api-whole"))
    assert folder_digest(str(tmp_path / "api")) == folder_digest(str(tmp_path / "api-whole"))
    streamed = dict((base + 0.5 * math).iter_tensors(block_size=SMALL_BLOCKS))
    whole = dict((base + 0.5 * math).iter_tensors())
    assert streamed.keys() == whole.keys() and all(torch.equal(streamed[k], whole[k]) for k in whole)


def test_tiles_cover_every_row_once():
    seen = []
    tiles.for_tiles(None, (1000, 700), lambda a, b: seen.append((a, b)))
    assert seen[0][0] == 0 and seen[-1][1] == 1000
    assert all(b == c for (_, b), (c, _) in zip(seen, seen[1:]))
    assert all(0 < (b - a) * 700 <= tiles.TILE for a, b in seen)
    assert tiles.tile_ranges((5,)) == [(0, 5)]  # one-dimensional tensors are never cut


# -- the writer places row blocks -----------------------------------------------------------------

def test_writer_places_row_blocks_in_any_order(tmp_path):
    planned = [PlannedTensor("a", (10, 4), torch.float32), PlannedTensor("b", (3,), torch.bfloat16)]
    writer = ShardedWriter(str(tmp_path), ShardLayout(planned, 10**9))
    a = torch.arange(40, dtype=torch.float32).reshape(10, 4)
    writer.write("a", a[6:], first_row=6)
    writer.write("b", torch.ones(3, dtype=torch.bfloat16))
    with pytest.raises(RuntimeError, match="written twice"):
        writer.write("a", a[6:], first_row=6)
    with pytest.raises(RuntimeError, match="planned"):
        writer.write("a", a[:5], first_row=7)  # past the last row
    with pytest.raises(RuntimeError, match="never written"):
        writer.finish()
    writer.write("a", a[:6].to(torch.float64).to(torch.float32), first_row=0)
    writer.finish()
    assert torch.equal(load_dir(str(tmp_path))["a"], a)


# -- the buffer pool ------------------------------------------------------------------------------

def test_pool_reuses_a_buffer_only_when_nothing_refers_to_it():
    pool = BufferPool(idle_limit=1 << 30)
    first = pool.take(3 << 20)
    view = first[10:20]
    address = first.data_ptr()
    del first
    second = pool.take(3 << 20)  # the view still refers to the first buffer
    assert second.data_ptr() != address
    del view, second
    third = pool.take(3 << 20)
    assert third.data_ptr() in (address, pool.lent[0].data_ptr())
    assert pool.allocated == 2 * pool.lent[0].numel()  # two buffers made, the third request reused one
    assert pool.take(100).numel() == 100  # small requests are left to the allocator


def test_pool_keeps_at_most_its_idle_limit():
    pool = BufferPool(idle_limit=5 << 20)
    bufs = [pool.take(4 << 20) for _ in range(3)]
    del bufs
    pool.take(1 << 21)
    assert pool.idle <= 5 << 20


# -- whole-model TIES -----------------------------------------------------------------------------

def global_ties(base: dict, models: list[dict], weights: list[float], densities: list[float]) -> np.ndarray:
    """The paper's code in numpy float64: each task vector flattened over the whole model (keys in
    order), trimmed to |τ| ≥ its (N − ⌊d·N⌋)-th smallest magnitude, then elect and disjoint mean."""
    names = sorted(n for n in base if base[n].dtype.is_floating_point)
    flat_base = np.concatenate([base[n].double().numpy().ravel() for n in names])
    trimmed = []
    for m, d in zip(models, densities):
        tau = np.concatenate([m[n].double().numpy().ravel() for n in names]) - flat_base
        mag = np.abs(tau.astype(np.float32))  # the engine forms τ in float32
        k = tau.size - int(d * tau.size)
        trimmed.append(np.where(mag >= np.sort(mag)[k - 1], tau, 0.0))
    wt = [w * t for w, t in zip(weights, trimmed)]
    sign = np.where(sum(wt) >= 0, 1.0, -1.0)
    agree = [(np.sign(x) == sign) & (x != 0) for x in wt]
    num = sum(x * a for x, a in zip(wt, agree))
    den = sum(w * a for w, a in zip(weights, agree))
    return names, flat_base + num / np.where(den == 0, 1.0, den)


MODEL_SCOPE = """
merge_method: ties
base_model: {m}/base
models:
  - {{model: {m}/ft_math, parameters: {{weight: 1.0, density: 0.5}}}}
  - {{model: {m}/ft_code, parameters: {{weight: 0.8, density: 0.3}}}}
  - {{model: {m}/ft_chat, parameters: {{weight: 0.5, density: 0.4}}}}
parameters: {{trim_scope: {scope}}}
dtype: float32
"""


@pytest.mark.parametrize("block_size", [None, SMALL_BLOCKS])
def test_model_scope_ties_is_the_papers_global_top_k(tmp_path, block_size):
    root = os.path.join(CONFIGS, "models")
    plan = write_plan(tmp_path, MODEL_SCOPE.format(m=root, scope="model"))
    mergekit_lite.run(plan, str(tmp_path / "out"), block_size=block_size)
    got = load_dir(str(tmp_path / "out"))
    models = [load_dir(os.path.join(root, n)) for n in ("ft_math", "ft_code", "ft_chat")]
    names, want = global_ties(load_dir(os.path.join(root, "base")), models, [1.0, 0.8, 0.5], [0.5, 0.3, 0.4])
    flat = np.concatenate([got[n].double().numpy().ravel() for n in names])
    assert np.abs(flat - want).max() < 1e-6  # float32 rounding of the same masks
    tensor_scope = write_plan(tmp_path, MODEL_SCOPE.format(m=root, scope="tensor"), "t.yml")
    mergekit_lite.run(tensor_scope, str(tmp_path / "t"))
    other = load_dir(str(tmp_path / "t"))
    assert np.abs(np.concatenate([other[n].double().numpy().ravel() for n in names]) - want).max() > 1e-4


def test_model_scope_ties_sweeps_the_model_before_merging():
    plan = os.path.join(CONFIGS, "ties.yml")
    text = open(plan).read().replace("density: [0.7, 0.3]", "density: 0.4")
    text = text.replace("parameters:\n  normalize: true", "parameters:\n  trim_scope: model\n  normalize: true")
    recipe = mergekit_lite.parse_plan(text)
    compiled = compile_plan(recipe, Options(), plan_dir=CONFIGS)
    names = [g for g, _ in compiled.groups]
    sweeps = [i for i, g in enumerate(names) if ".model." in g]
    assert sweeps == list(range(len(sweeps))) and len(sweeps) == 2 * describe(compiled)["output_tensors"]


def test_model_scope_refuses_a_density_that_varies_over_tensors(tmp_path):
    plan = open(os.path.join(CONFIGS, "ties.yml")).read()
    plan = plan.replace("parameters:\n  normalize: true", "parameters:\n  trim_scope: model\n  normalize: true")
    with pytest.raises(MergeError, match="same density"):
        compile_plan(mergekit_lite.parse_plan(plan), Options(), plan_dir=CONFIGS)


def test_model_scope_refuses_the_l1_rescale(tmp_path):
    root = os.path.join(CONFIGS, "models")
    text = MODEL_SCOPE.format(m=root, scope="model").replace("{trim_scope: model}",
                                                            "{trim_scope: model, rescale: true}")
    with pytest.raises(MergeError, match="rescale_mode: density"):
        compile_plan(write_plan(tmp_path, text), Options())


def test_blocks_split_rows_to_the_target():
    streamer = blocks._Streamer([], block_numel=1000)

    class Node:
        split_rows = 100
        outputs = [type("S", (), {"shape": (100, 30)})()]

    assert streamer.blocks([Node()]) == [(r, min(r + 33, 100)) for r in range(0, 100, 33)]
    Node.split_rows = None
    assert streamer.blocks([Node()]) == [(None, None)]


def test_model_scope_from_python_sees_the_whole_model_even_for_one_tensor():
    from mergekit_lite import Model

    base = Model(os.path.join(CONFIGS, "models", "base"))
    a = Model(os.path.join(CONFIGS, "models", "ft_math")) - base
    b = Model(os.path.join(CONFIGS, "models", "ft_code")) - base
    merged = base.ties([a, b], density=0.4, trim_scope="model")
    assert "trim_scope: model" in merged.to_plan()
    whole = dict(merged.iter_tensors())
    name = "model.layers.1.mlp.up_proj.weight"
    assert torch.equal(merged.tensor(name), whole[name])
    per_tensor = base.ties([a, b], density=0.4).tensor(name)
    assert not torch.equal(per_tensor, whole[name])


def test_mapped_reads_equal_positioned_reads_and_never_write_the_file(tmp_path):
    from mergekit_lite.io.reader import TensorReader, open_model

    reader = TensorReader()
    model = open_model(os.path.join(CONFIGS, "models", "ft_math"))
    for meta in model.tensors.values():
        mapped = reader.map(meta.file, meta.offset, meta.shape, meta.dtype)
        assert torch.equal(mapped, reader.read(meta.file, meta.offset, meta.shape, meta.dtype)), meta.name
    meta = model.tensors["model.embed_tokens.weight"]
    before = open(meta.file, "rb").read()
    reader.map(meta.file, meta.offset + 4096, (2, 64), meta.dtype).fill_(7.0)  # copy-on-write
    assert open(meta.file, "rb").read() == before
    with pytest.raises(MergeError, match="truncated"):
        reader.map(meta.file, os.path.getsize(meta.file) - 8, (4,), torch.float32)
    reader.close()
