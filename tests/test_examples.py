"""The shipped example models are reproducible, and every example plan runs."""

import glob
import os

import pytest

import mergekit_lite
from mergekit_lite.example_adapters import write_adapters
from mergekit_lite.examples import check_examples

from conftest import REPO, load_dir

PLANS = sorted(glob.glob(os.path.join(REPO, "merge_configs", "*.yml")))


def test_committed_example_models_match_a_fresh_generation():
    assert check_examples(os.path.join(REPO, "merge_configs", "models")) == []


def test_committed_example_adapters_match_a_fresh_generation():
    assert check_examples(os.path.join(REPO, "merge_configs", "adapters"), write_adapters) == []


@pytest.mark.parametrize("plan", PLANS, ids=[os.path.basename(p) for p in PLANS])
def test_example_plan_runs(plan, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # model paths resolve relative to the plan file too
    out = tmp_path / "out"
    stats = mergekit_lite.run(plan, str(out))
    tensors = load_dir(str(out))
    assert stats.tensors == len(tensors) > 0
    adapter = "output: adapter" in open(plan).read()
    assert (out / ("adapter_config.json" if adapter else "config.json")).exists()
