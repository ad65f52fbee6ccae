"""The CUDA path (mergekit_lite/device.py): pinned reads uploaded on a side stream, merges on the GPU,
results copied back asynchronously, a device budget of its own. Skipped without a CUDA device."""

from __future__ import annotations

import os

import pytest
import torch

import mergekit_lite
from mergekit_lite.errors import BudgetExceeded, MergeError
from mergekit_lite.merge import Options, compile_plan, execute

from conftest import REPO, load_dir

CONFIGS = os.path.join(REPO, "merge_configs")
cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
PLANS = ["linear.yml", "task_arithmetic.yml", "ties.yml", "slerp.yml", "breadcrumbs_ties.yml", "multistep.yml",
         "dare_ties.yml", "karcher.yml", "solar_upscale.yml"]


def close(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal up to the last bits: the GPU's kernels may fuse a multiply-add the CPU rounds twice."""
    if a.dtype == torch.float32:
        return torch.allclose(a, b, rtol=1e-5, atol=1e-7)
    return torch.allclose(a.float(), b.float(), rtol=2 ** -7, atol=1e-6)  # one bfloat16 step


@cuda
@pytest.mark.parametrize("plan", PLANS)
@pytest.mark.parametrize("block_size", [None, 4 * 3000])
def test_gpu_merge_matches_the_cpu(plan, block_size, tmp_path):
    path = os.path.join(CONFIGS, plan)
    mergekit_lite.run(path, str(tmp_path / "cpu"), device="cpu")
    stats = mergekit_lite.run(path, str(tmp_path / "gpu"), device="cuda", block_size=block_size)
    cpu, gpu = load_dir(str(tmp_path / "cpu")), load_dir(str(tmp_path / "gpu"))
    assert set(cpu) == set(gpu)
    assert all(close(cpu[k], gpu[k]) for k in cpu), [k for k in cpu if not close(cpu[k], gpu[k])][:3]
    assert stats.device.startswith("cuda") and stats.peak_device_bytes > 0


@cuda
def test_device_budget_caps_device_memory(tmp_path):
    path = os.path.join(CONFIGS, "ties.yml")
    compiled = compile_plan(path, Options(device="cuda", block_size=4 * 3000))
    budget = compiled.max_need * 3
    stats = execute(compiled, str(tmp_path / "out"), Options(device="cuda", max_device_memory=budget))
    assert 0 < stats.peak_device_bytes <= budget + (8 << 20)  # the allocator's block rounding
    with pytest.raises(BudgetExceeded, match="device memory budget"):
        execute(compiled, str(tmp_path / "small"), Options(device="cuda", max_device_memory=1000))


@cuda
def test_gpu_results_handed_to_python_are_complete():
    from mergekit_lite import Model

    base = Model(os.path.join(CONFIGS, "models", "base"))
    math = Model(os.path.join(CONFIGS, "models", "ft_math")) - base
    on_gpu = dict((base + 0.5 * math).iter_tensors(device="cuda"))
    on_cpu = dict((base + 0.5 * math).iter_tensors(device="cpu"))
    assert all(v.device.type == "cpu" and close(on_cpu[k], v) for k, v in on_gpu.items())


def test_asking_for_cuda_without_it_is_a_readable_error(tmp_path):
    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(MergeError, match="CUDA is not available"):
        mergekit_lite.run(os.path.join(CONFIGS, "linear.yml"), str(tmp_path / "out"), device="cuda")
    assert not os.path.exists(tmp_path / "out")
