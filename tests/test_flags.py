"""mergekit's flags: every one mapped (table-driven), shard-size units, unknown flags, and the
effects that show in an output folder."""

import os
import re

import pytest
import torch

import mergekit_lite
from mergekit_lite.cli import build_parser
from mergekit_lite.dropin import main_yaml, options_for, prepare, yaml_parser
from mergekit_lite.errors import MergeError, PlanError
from mergekit_lite.flags import FLAGS, Settings, apply_flags
from mergekit_lite.io.sizes import parse_count
from mergekit_lite.io.writer import PlannedTensor, ShardLayout, ShardLimit
from mergekit_lite.merge import Options

from conftest import REPO, load_dir

# argv -> (Options fields it changes, and what else: threads, cache, verbose, a note or refusal containing ...)
TABLE = [
    (["--device", "cpu"], {"device": "cpu"}, {}),
    (["--cuda"], {"device": "cuda"}, {}),
    (["--no-cuda"], {"device": "cpu"}, {}),
    (["--cuda", "--device", "cpu"], {"device": "cpu"}, {}),  # --device wins, as in mergekit
    (["--gpu-rich"], {"device": "cuda"}, {"note": "one device"}),
    (["--multi-gpu"], {}, {"note": "one device"}),
    (["--no-multi-gpu"], {}, {}),
    (["--low-cpu-memory"], {}, {}),
    (["--read-to-gpu"], {}, {}),
    (["-j", "2"], {}, {"threads": 2}),
    (["--num-threads", "3"], {}, {"threads": 3}),
    (["--out-shard-size", "1B"], {"out_shard_size": "1B"}, {}),
    (["--copy-tokenizer"], {"copy_tokenizer": True}, {}),
    (["--no-copy-tokenizer"], {"copy_tokenizer": False}, {}),
    (["--write-model-card"], {"write_model_card": True}, {}),
    (["--no-write-model-card"], {"write_model_card": False}, {}),
    (["--clone-tensors"], {}, {}),
    (["--safe-serialization"], {}, {}),
    (["--no-safe-serialization"], {}, {"refused": "safetensors only"}),
    (["--random-seed", "42"], {"seed": 42}, {}),
    (["--lazy-unpickle"], {}, {}),
    (["--lazy-loader"], {}, {}),
    (["--trust-remote-code"], {}, {}),
    (["--allow-crimes"], {"allow_crimes": True}, {}),
    (["--unsafe-truncate-embeddings"], {}, {"refused": "never truncates embeddings"}),
    (["--no-unsafe-truncate-embeddings"], {}, {}),
    (["--transformers-cache", "/tmp/hf"], {}, {"cache": "/tmp/hf"}),
    (["--lora-merge-cache", "/tmp/lora"], {}, {}),
    (["--lora-merge-dtype", "bfloat16"], {}, {"note": "float32"}),
    (["--async-write"], {}, {}),
    (["--write-threads", "4"], {}, {}),
    (["-v"], {}, {"verbose": 1}),
    (["-vv"], {}, {"verbose": 2}),
    (["--quiet"], {"quiet": True}, {}),
    (["--no-quiet"], {"quiet": False}, {}),
]


def _check(args, fields, other):
    settings = apply_flags(args)
    assert options_for(args, settings) == Options(**{"quiet": False, **fields})
    assert settings.threads == other.get("threads") and settings.cache == other.get("cache")
    assert settings.verbose == other.get("verbose", 0)
    assert [n for n in settings.notes if other.get("note", "\0") in n] == settings.notes
    assert len(settings.notes) == ("note" in other)
    assert [r for r in settings.refused if other.get("refused", "\0") in r] == settings.refused
    assert len(settings.refused) == ("refused" in other)


@pytest.mark.parametrize("argv,fields,other", TABLE, ids=[" ".join(r[0]) for r in TABLE])
def test_each_mergekit_flag_maps_on_mergekit_yaml_and_run(argv, fields, other):
    _check(yaml_parser().parse_args(["c.yml", "out", *argv]), fields, other)
    if "--no-quiet" not in argv:  # run has its own -q/--quiet (and --device): the same meaning
        _check(build_parser().parse_args(["run", "c.yml", "out", *argv]), fields, other)


def test_the_table_covers_every_flag_and_readme_lists_them():
    given = {a for argv, _, _ in TABLE for a in argv if a.startswith("-")}
    readme = open(os.path.join(REPO, "README.md"), encoding="utf-8").read()
    section = readme[readme.index("| mergekit flag |"):]
    for flag in FLAGS:
        assert any(n in given or f"--no-{n[2:]}" in given for n in flag.names), flag.names
        assert f"`{flag.names[-1]}" in section, f"README's flag table lacks {flag.names[-1]}"


def test_own_flags_win_over_mergekit_aliases():
    args = build_parser().parse_args(["run", "c.yml", "out", "--seed", "1", "--random-seed", "2", "--cuda",
                                      "--device", "cpu"])
    assert options_for(args, apply_flags(args)) == Options(seed=1, device="cpu", quiet=False)


# -- shard sizes ------------------------------------------------------------------------------------

def test_out_shard_size_counts_parameters_as_mergekit_says():
    assert [parse_count(x) for x in ("1B", "500M", "20k", "1.5B", 1000, "7")] == [
        10**9, 5 * 10**8, 20_000, 1_500_000_000, 1000, 7]
    with pytest.raises(ValueError):
        parse_count("5GB")
    assert Options(out_shard_size="1B").shard_size() == ShardLimit(10**9, "parameters")
    assert Options(out_shard_size="1B", max_shard_size="1KB").shard_size().unit == "parameters"
    # a cap of 1000 parameters: bfloat16 and float32 tensors of 600 entries do not share a shard
    ts = [PlannedTensor("a", (600,), torch.bfloat16), PlannedTensor("b", (600,), torch.float32),
          PlannedTensor("c", (400,), torch.float32)]
    by_params = ShardLayout(ts, ShardLimit(1000, "parameters"))
    assert [[t.name for t in s.tensors] for s in by_params.shards] == [["a"], ["b", "c"]]
    by_bytes = ShardLayout(ts, 2000)  # 1000 float16 parameters in bytes: a (1200 B) alone, b (2400 B) alone
    assert [[t.name for t in s.tensors] for s in by_bytes.shards] == [["a"], ["b"], ["c"]]


def test_max_shard_size_1B_is_refused_as_ambiguous():
    with pytest.raises(MergeError, match="ambiguous.*--out-shard-size 1B"):
        Options(max_shard_size="1B").shard_size()
    assert Options(max_shard_size="1GB").shard_size() == 10**9
    with pytest.raises(MergeError, match="--out-shard-size"):
        Options(out_shard_size="lots").shard_size()


def test_out_shard_size_end_to_end(tmp_path):
    out = tmp_path / "o"
    assert main_yaml([f"{REPO}/merge_configs/ties.yml", str(out), "--out-shard-size", "60k", "--quiet"]) == 0
    import json

    index = json.load(open(out / "model.safetensors.index.json"))
    tensors = load_dir(str(out))
    per_shard = {}
    for name, shard in index["weight_map"].items():
        per_shard.setdefault(shard, []).append(tensors[name].numel())
    assert len(per_shard) >= 3
    assert all(sum(n) <= 60_000 or len(n) == 1 for n in per_shard.values())


# -- unknown flags, refusals, effects -------------------------------------------------------------------

@pytest.mark.parametrize("argv,guess", [
    (["mergekit-yaml", "c.yml", "out", "--cudaa"], "--cuda"),
    (["mergekit-yaml", "c.yml", "out", "--random-sed", "1"], "--random-seed"),
    (["run", "c.yml", "out", "--out-shard", "1B", "--lazy-unpicle"], "--lazy-unpickle"),
    (["run", "c.yml", "out", "--max-shardsize", "1GB"], "--max-shard-size"),
])
def test_an_unknown_flag_names_the_closest_known_one(argv, guess, capsys):
    parser = yaml_parser() if argv[0] == "mergekit-yaml" else build_parser()
    with pytest.raises(SystemExit) as exc:
        parser.parse_args(argv[1:] if argv[0] == "mergekit-yaml" else argv)
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "unrecognized arguments" in err and f"did you mean {guess}?" in err


def test_refused_flags_stop_before_anything_is_written(tmp_path, capsys):
    out = tmp_path / "o"
    assert main_yaml([f"{REPO}/merge_configs/linear.yml", str(out), "--no-safe-serialization"]) == 2
    assert "writes safetensors only" in capsys.readouterr().err and not out.exists()


def test_process_settings_threads_and_hub_cache(monkeypatch, tmp_path):
    before = torch.get_num_threads()
    monkeypatch.delenv("HF_HUB_CACHE", raising=False)
    try:
        prepare(Settings(threads=1, cache=str(tmp_path / "hf")))
        assert torch.get_num_threads() == 1 and os.environ["HF_HUB_CACHE"] == str(tmp_path / "hf")
    finally:
        torch.set_num_threads(before)
    with pytest.raises(MergeError, match="at least 1"):
        prepare(Settings(threads=0))


def test_copy_tokenizer_and_model_card_switches(tmp_path):
    plan = f"{REPO}/merge_configs/linear.yml"
    assert main_yaml([plan, str(tmp_path / "all"), "--quiet"]) == 0
    assert main_yaml([plan, str(tmp_path / "bare"), "--quiet", "--no-copy-tokenizer", "--no-write-model-card"]) == 0
    files = sorted(os.listdir(tmp_path / "all"))
    assert files == ["README.md", "config.json", "mergekit_config.yml", "model.safetensors",
                     "special_tokens_map.json", "tokenizer.json", "tokenizer_config.json"]
    assert sorted(os.listdir(tmp_path / "bare")) == ["config.json", "model.safetensors"]
    same = load_dir(str(tmp_path / "all")), load_dir(str(tmp_path / "bare"))
    assert all(torch.equal(same[0][k], same[1][k]) for k in same[0])


def test_allow_crimes_merges_models_that_name_different_architectures(models, tmp_path):
    import json
    import shutil

    other = tmp_path / "mistral"
    shutil.copytree(models["paths"]["b"], other)
    cfg = json.load(open(other / "config.json"))
    json.dump(dict(cfg, model_type="mistral", architectures=["MistralForCausalLM"]), open(other / "config.json", "w"))
    plan = tmp_path / "p.yml"
    plan.write_text(f"merge_method: linear\nmodels:\n  - {{model: {models['paths']['a']}, parameters: {{weight: 1}}}}\n"
                    f"  - {{model: {other}, parameters: {{weight: 1}}}}\n")
    with pytest.raises(PlanError, match="different architectures.*--allow-crimes"):
        mergekit_lite.run(str(plan), str(tmp_path / "no"))
    compiled = mergekit_lite.compile_plan(str(plan), Options(allow_crimes=True))
    assert any(re.search("different architectures.*--allow-crimes", w) for w in compiled.warnings)
    mergekit_lite.run(str(plan), str(tmp_path / "yes"), allow_crimes=True)
    assert json.load(open(tmp_path / "yes" / "config.json"))["model_type"] == cfg["model_type"]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given without CUDA")
def test_cuda_flag_asks_for_cuda(tmp_path, capsys):
    assert main_yaml([f"{REPO}/merge_configs/linear.yml", str(tmp_path / "o"), "--cuda"]) == 2
    assert "CUDA is not available" in capsys.readouterr().err
