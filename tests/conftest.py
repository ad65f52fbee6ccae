"""Shared fixtures: tiny sharded models written with the example generator's helpers."""

from __future__ import annotations

import os
import textwrap

import pytest
import torch
from safetensors import safe_open

from mergekit_lite.examples import LLAMA_CONFIG, finetune, llama_shapes, random_model, save_model

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_dir(folder: str) -> dict[str, torch.Tensor]:
    """Every tensor of a model folder, read back with safetensors."""
    out = {}
    for f in sorted(os.listdir(folder)):
        if f.endswith(".safetensors"):
            with safe_open(os.path.join(folder, f), "pt") as h:
                for k in h.keys():
                    assert k not in out, f"{k} in two shards"
                    out[k] = h.get_tensor(k)
    return out


def write_plan(folder, text: str, name: str = "plan.yml") -> str:
    path = os.path.join(str(folder), name)
    with open(path, "w", encoding="utf-8") as fh:
        fh.write(textwrap.dedent(text))
    return path


@pytest.fixture(scope="session")
def models(tmp_path_factory):
    """base + three fine-tunes (dense, sparse, opposed task vectors), 4 layers, 3 shards each."""
    root = tmp_path_factory.mktemp("models")
    base = random_model(llama_shapes(LLAMA_CONFIG), seed=7)
    tensors = {
        "base": base,
        "a": finetune(base, "dense", 8),
        "b": finetune(base, "sparse", 9),
    }
    tensors["c"] = finetune(base, "opposed", 10, like=tensors["a"])
    paths = {}
    for name, ts in tensors.items():
        paths[name] = save_model(str(root / name), ts, LLAMA_CONFIG, max_shard_bytes=400_000)
    return {"paths": paths, "tensors": tensors, "root": root}


@pytest.fixture
def out_dir(tmp_path):
    return str(tmp_path / "out")
