"""mergekit's command lines run unchanged: mergekit-multi's intermediate folders and --lazy, and,
when mergekit 0.1.5 is available (MERGEKIT_YAML), the same tensors and the same output files as
mergekit's own mergekit-yaml and mergekit-multi given mergekit's usual flags."""

import json
import os
import re
import shutil
import subprocess
import textwrap

import pytest
import torch

import mergekit_lite
from mergekit_lite.dropin import mergekit_command
from mergekit_lite.dropin import main_multi, main_yaml

from conftest import load_dir, write_plan

MERGEKIT = os.environ.get("MERGEKIT_YAML") or mergekit_command()  # mergekit's, not our entry point
needs_mergekit = pytest.mark.skipif(not (MERGEKIT and os.path.exists(MERGEKIT)),
                                    reason="mergekit-yaml not found (set MERGEKIT_YAML to run the parity tests)")
BAR_FLAGS = ["--copy-tokenizer", "--out-shard-size", "1B", "--random-seed", "42", "--lazy-unpickle",
             "--allow-crimes", "-j", "2", "--quiet"]

RECIPE = """\
name: soup
merge_method: linear
models:
  - {{model: {a}, parameters: {{weight: [0.3, 0.7]}}}}
  - {{model: {b}, parameters: {{weight: 0.5}}}}
dtype: bfloat16
---
merge_method: ties
base_model: {base}
models:
  - {{model: soup, parameters: {{weight: 1.0, density: 0.6}}}}
  - {{model: {c}, parameters: {{weight: -0.5, density: 0.4}}}}
dtype: float32
"""


def same(x: str, y: str) -> bool:
    a, b = load_dir(x), load_dir(y)
    return set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)


def test_multi_writes_named_merges_to_the_intermediate_dir(models, tmp_path):
    recipe = write_plan(tmp_path, RECIPE.format(**models["paths"]), "multi.yml")
    inter, out = tmp_path / "inter", tmp_path / "final"
    assert main_multi([recipe, "--out-path", str(out), "-I", str(inter), "--quiet"]) == 0
    assert sorted(os.listdir(inter)) == ["soup"]
    files = ["README.md", "config.json", "mergekit_config.yml", "model.safetensors", "special_tokens_map.json",
             "tokenizer.json", "tokenizer_config.json"]
    assert sorted(os.listdir(inter / "soup")) == files == sorted(os.listdir(out))
    # the same bits as running the stages one after another
    soup_only = write_plan(tmp_path, RECIPE.format(**models["paths"]).split("---")[0].replace("name: soup\n", ""),
                           "soup.yml")
    mergekit_lite.run(soup_only, str(tmp_path / "soup_alone"))
    assert same(str(inter / "soup"), str(tmp_path / "soup_alone"))
    final_only = write_plan(tmp_path, RECIPE.format(**models["paths"]).split("---\n")[1].replace(
        "model: soup", f"model: {inter / 'soup'}"), "final.yml")
    mergekit_lite.run(final_only, str(tmp_path / "final_alone"))
    assert same(str(out), str(tmp_path / "final_alone"))


def test_multi_lazy_reuses_an_intermediate_already_on_disk(models, tmp_path):
    recipe = write_plan(tmp_path, RECIPE.format(**models["paths"]), "multi.yml")
    inter = tmp_path / "inter"
    assert main_multi([recipe, "--out-path", str(tmp_path / "one"), "-I", str(inter), "--quiet"]) == 0
    # replace the intermediate by another model: --lazy (the default) must use what is on disk
    shutil.rmtree(inter / "soup")
    shutil.copytree(models["paths"]["a"], inter / "soup")
    assert main_multi([recipe, "--out-path", str(tmp_path / "two"), "-I", str(inter), "--quiet"]) == 0
    assert same(str(inter / "soup"), models["paths"]["a"])  # untouched
    final_on_c = write_plan(tmp_path, RECIPE.format(**models["paths"]).split("---\n")[1].replace(
        "model: soup", f"model: {models['paths']['a']}"), "final.yml")
    mergekit_lite.run(final_on_c, str(tmp_path / "expected"))
    assert same(str(tmp_path / "two"), str(tmp_path / "expected"))
    # --no-lazy merges it again: an existing folder is then replaced only with --overwrite, and this
    # one (a copy of another model) only with --force-overwrite, since mergekit-lite did not write it (issue 13)
    assert main_multi([recipe, "--out-path", str(tmp_path / "three"), "-I", str(inter), "--no-lazy", "--quiet"]) == 2
    assert main_multi([recipe, "--out-path", str(tmp_path / "three"), "-I", str(inter), "--no-lazy", "--quiet",
                       "--overwrite"]) == 2
    assert same(str(inter / "soup"), models["paths"]["a"])  # untouched
    assert main_multi([recipe, "--out-path", str(tmp_path / "three"), "-I", str(inter), "--no-lazy", "--quiet",
                       "--force-overwrite"]) == 0
    assert same(str(tmp_path / "three"), str(tmp_path / "one"))


def test_multi_without_an_unnamed_merge_writes_every_merge_to_the_intermediate_dir(models, tmp_path, capsys):
    text = RECIPE.format(**models["paths"]).replace("---\n", "---\nname: final\n")
    recipe = write_plan(tmp_path, text, "named.yml")
    inter = tmp_path / "inter"
    assert main_multi([recipe, "-I", str(inter), "--quiet"]) == 0
    assert sorted(os.listdir(inter)) == ["final", "soup"]
    assert "model.safetensors" in os.listdir(inter / "final")
    assert main_multi([recipe, "-I", str(inter), "--quiet"]) == 0  # --lazy: everything exists already
    assert "nothing to do" in capsys.readouterr().err


def test_multi_needs_out_path_for_an_unnamed_merge(models, tmp_path, capsys):
    recipe = write_plan(tmp_path, RECIPE.format(**models["paths"]), "multi.yml")
    assert main_multi([recipe, "-I", str(tmp_path / "inter")]) == 2
    assert "--out-path is required" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main_multi([recipe, "--out-path", str(tmp_path / "o")])  # -I is required, as in mergekit
    assert "--intermediate-dir" in capsys.readouterr().err


# -- against mergekit 0.1.5 -----------------------------------------------------------------------------

PLANS = {
    "linear": """
        merge_method: linear
        models:
          - {{model: {a}, parameters: {{weight: [0.2, 0.6]}}}}
          - {{model: {b}, parameters: {{weight: 0.4}}}}
        dtype: float32
        """,
    "ties": """
        merge_method: ties
        base_model: {base}
        models:
          - {{model: {a}, parameters: {{weight: 1.0, density: 0.5}}}}
          - {{model: {c}, parameters: {{weight: 0.6, density: 0.7}}}}
        dtype: float32
        """,
    "frankenmerge": """
        merge_method: passthrough
        slices:
          - sources: [{{model: {a}, layer_range: [0, 3]}}]
          - sources: [{{model: {b}, layer_range: [1, 4]}}]
        dtype: float32
        """,
    "ram": """
        merge_method: ram
        base_model: {base}
        models: [{{model: {a}}}, {{model: {b}}}]
        parameters: {{epsilon: 0.002}}
        dtype: float32
        """,
    "arcee_fusion": """
        merge_method: arcee_fusion
        base_model: {base}
        models: [{{model: {base}}}, {{model: {a}}}]
        dtype: float32
        """,
}

# Runs the jobs in one process (mergekit's import alone takes seconds). mergekit applies -j with
# torch.set_num_interop_threads, which torch allows once per process: later calls are let pass.
DRIVER = """
import json, sys
import torch
_set_interop = torch.set_num_interop_threads
def _once(n):
    try:
        _set_interop(n)
    except RuntimeError:
        pass
torch.set_num_interop_threads = _once
from mergekit.scripts.multimerge import main as multi
from mergekit.scripts.run_yaml import main as yaml
for tool, args in json.load(open(sys.argv[1])):
    try:
        (yaml if tool == "yaml" else multi)(args, standalone_mode=False)
    except SystemExit as exc:
        if exc.code:
            raise
from mergekit.merge_methods.registry import registered_methods
json.dump(sorted(m.spec.name for m in registered_methods()), open(sys.argv[2], "w"))
"""


def run_mergekit(jobs: list, workdir: str) -> None:
    """Run mergekit's mergekit-yaml and mergekit-multi on (tool, args) jobs in one process."""
    with open(MERGEKIT, encoding="utf-8", errors="replace") as fh:
        interp = fh.readline()[2:].strip()
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    if "python" in os.path.basename(interp.split()[0] if interp else ""):
        path = os.path.join(workdir, "jobs.json")
        json.dump(jobs, open(path, "w"))
        r = subprocess.run([*interp.split(), "-c", DRIVER, path, os.path.join(workdir, "methods.json")],
                           capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        return
    for tool, args in jobs:
        exe = MERGEKIT if tool == "yaml" else os.path.join(os.path.dirname(MERGEKIT), "mergekit-multi")
        r = subprocess.run([exe, *args], capture_output=True, text=True, env=env)
        assert r.returncode == 0, r.stderr[-3000:]


def file_set(folder) -> list[str]:
    """The files of an output folder, shard names aside."""
    return sorted(re.sub(r"^model-\d{5}-of-\d{5}\.safetensors$", "model-SHARD.safetensors", f)
                  for f in os.listdir(folder))


def assert_close(ours: str, theirs: str) -> None:
    a, b = load_dir(ours), load_dir(theirs)
    assert set(a) == set(b)
    for k in b:
        assert a[k].dtype == b[k].dtype, k
        x, y = a[k].double(), b[k].double()
        assert float((x - y).abs().max()) <= 1e-5 * max(float(y.abs().max()), 1e-30), k


@pytest.fixture(scope="module")
def both(models, tmp_path_factory):
    root = tmp_path_factory.mktemp("dropin")
    jobs, ours = [], []
    for name, text in PLANS.items():
        plan = write_plan(root, textwrap.dedent(text.format(**models["paths"])), f"{name}.yml")
        jobs.append(("yaml", [plan, str(root / f"mk_{name}"), *BAR_FLAGS]))
        ours.append((main_yaml, [plan, str(root / f"ml_{name}"), *BAR_FLAGS]))
    # float32 stages: mergekit computes a bfloat16 stage in bfloat16, we round once (a deliberate difference)
    recipe = write_plan(root, RECIPE.format(**models["paths"]).replace("bfloat16", "float32"), "multi.yml")
    for who in ("mk", "ml"):
        args = [recipe, "--out-path", str(root / f"{who}_multi"), "-I", str(root / f"{who}_inter"), *BAR_FLAGS]
        (jobs.append(("multi", args)) if who == "mk" else ours.append((main_multi, args)))
    run_mergekit(jobs, str(root))
    threads = torch.get_num_threads()
    try:
        for entry, args in ours:  # in this process: -j 2 sets torch's threads, restored after
            assert entry(args) == 0
    finally:
        torch.set_num_threads(threads)
    return root


@needs_mergekit
@pytest.mark.parametrize("name", sorted(PLANS))
def test_mergekit_yaml_with_mergekits_flags_gives_mergekits_tensors_and_files(both, name):
    assert_close(str(both / f"ml_{name}"), str(both / f"mk_{name}"))
    assert file_set(both / f"ml_{name}") == file_set(both / f"mk_{name}")


@needs_mergekit
def test_every_mergekit_method_is_here(both):
    path = both / "methods.json"
    if not path.exists():
        pytest.skip("mergekit-yaml is not a Python console script: its methods were not listed")
    from mergekit_lite import methods

    assert set(json.load(open(path))) <= set(methods.names())


@needs_mergekit
def test_mergekit_multi_recipe_gives_mergekits_results(both):
    assert os.listdir(both / "ml_inter") == os.listdir(both / "mk_inter") == ["soup"]
    for ours, theirs in (("ml_multi", "mk_multi"), ("ml_inter/soup", "mk_inter/soup")):
        assert_close(str(both / ours), str(both / theirs))
        assert file_set(both / ours) == file_set(both / theirs)
