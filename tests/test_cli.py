"""The command line: exit status 2 and a readable message for bad input; plan and run work."""

import os
import subprocess
import sys

from conftest import REPO, load_dir, write_plan


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "mergekit_lite", *args], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=300)


def test_bad_plan_exits_2_with_located_message_and_no_output(tmp_path):
    plan = write_plan(tmp_path, "merge_method: linear\nmodels:\n  - model: a\n    parameters: {weight: 1}\nwat: 1\n")
    out = tmp_path / "out"
    r = cli("run", plan, str(out))
    assert r.returncode == 2
    assert f"{plan}:5: wat: unknown key 'wat'" in r.stderr
    assert "Traceback" not in r.stderr
    assert not out.exists()


def test_missing_model_exits_2(tmp_path):
    plan = write_plan(tmp_path, "merge_method: linear\nmodels:\n  - model: ./nowhere\n    parameters: {weight: 1}\n")
    r = cli("run", plan, str(tmp_path / "out"))
    assert r.returncode == 2 and "model './nowhere' not found" in r.stderr and "Traceback" not in r.stderr


def test_malformed_yaml_exits_2(tmp_path):
    plan = write_plan(tmp_path, "merge_method: [linear\n")
    r = cli("plan", plan)
    assert r.returncode == 2 and "malformed YAML" in r.stderr


def test_existing_output_exits_2(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    r = cli("run", "merge_configs/linear.yml", str(out))
    assert r.returncode == 2 and "already exists" in r.stderr


def test_run_and_plan_on_example(tmp_path):
    out = tmp_path / "out"
    r = cli("run", "merge_configs/task_arithmetic.yml", str(out), "--device", "cpu", "--max-shard-size", "200KB")
    assert r.returncode == 0, r.stderr
    assert "wrote 39 tensors" in r.stdout
    assert len([f for f in os.listdir(out) if f.endswith(".safetensors")]) >= 2
    assert all(t.dtype.is_floating_point for t in load_dir(str(out)).values())
    r = cli("plan", "merge_configs/task_arithmetic.yml")
    assert r.returncode == 0, r.stderr
    for text in ("output tensors: 39", "inputs per merged tensor: 4", "tensor reads: 156", "estimated peak"):
        assert text in r.stdout


def test_run_quiet_prints_nothing(tmp_path):
    r = cli("run", "merge_configs/linear.yml", str(tmp_path / "o"), "-q")
    assert r.returncode == 0 and r.stdout == "" and r.stderr == ""


def test_cuda_requested_without_cuda_is_a_clear_error(tmp_path):
    import torch

    if torch.cuda.is_available():
        return
    r = cli("run", "merge_configs/linear.yml", str(tmp_path / "o"), "--device", "cuda")
    assert r.returncode == 2 and "CUDA is not available" in r.stderr


def test_methods_lists_parameters():
    r = cli("methods")
    assert r.returncode == 0 and "task_arithmetic" in r.stdout and "lambda (global, float, default 1.0)" in r.stdout
